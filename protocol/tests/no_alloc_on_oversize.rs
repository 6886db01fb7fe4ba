//! An oversized frame is refused from its length prefix, before any buffer
//! for it is allocated. A counting global allocator records the largest
//! single allocation made while reading frames that announce huge lengths.
//! (Its own test binary, so no other test's allocations interfere.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use relay_protocol::codec::{read_frame, read_frame_bytes, MAX_FRAME_LEN};
use relay_protocol::{ClientHello, FrameError};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only
// records the requested size.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn huge_length_prefixes_allocate_nothing_large() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        for len in [u32::MAX, 1 << 30, (MAX_FRAME_LEN + 1) as u32] {
            let mut wire: Vec<u8> = len.to_be_bytes().to_vec();
            // Some body bytes follow, as a hostile peer would send.
            wire.extend_from_slice(&[0u8; 64]);
            LARGEST.store(0, Ordering::Relaxed);
            let mut r = &wire[..];
            let res = read_frame::<_, ClientHello>(&mut r).await;
            let largest = LARGEST.load(Ordering::Relaxed);
            assert!(matches!(res, Err(FrameError::TooLarge { .. })), "{res:?}");
            assert!(
                largest < 64 * 1024,
                "allocated {largest} bytes for a refused {len}-byte frame"
            );
        }
        // Control: a frame within the limit does allocate its body, so the
        // counter above is really watching.
        let mut wire = (60_000u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&vec![0u8; 60_000]);
        LARGEST.store(0, Ordering::Relaxed);
        let mut r = &wire[..];
        let body = read_frame_bytes(&mut r, MAX_FRAME_LEN).await.unwrap();
        assert_eq!(body.len(), 60_000);
        assert!(LARGEST.load(Ordering::Relaxed) >= 60_000);
    });
}
