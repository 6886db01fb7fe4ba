//! Giving memory back to the system after a load peak.
//!
//! glibc's malloc keeps the pages of freed blocks in its arenas for reuse.
//! After a peak (a relay holding 16,384 CONNECT clients, an edge serving
//! 9,000 streams at once) the process is back to its baseline in fds and
//! tasks but keeps the peak's memory: measured, a relay at 15 MiB grew to
//! 334 MiB and stayed at 339 MiB once every client had gone. `malloc_trim`
//! hands the free pages inside every arena back (`MADV_DONTNEED`); run once
//! the load has fallen, it brought that relay back to 38 MiB and the edge
//! from 77 MiB to 15 MiB (docs/benchmarks.md, "Soak").
//!
//! Why a trim after the peak and not another allocator: jemalloc with fast
//! decay did about as well (27 MiB) but builds a C library with autoconf in
//! every build; the mimalloc versions tried kept 118-341 MiB. Why not
//! always: a trim walks every arena under its lock (milliseconds at a
//! large heap), so it runs only when the live task count has fallen to a
//! quarter of its highest value since the last trim, and by at least
//! [`PEAK_TASKS`], on a thread of its own: a few trims per peak at most
//! (each needs the count to fall to a quarter again).
//!
//! Smaller loads never make such a peak: an edge serving a few hundred UDP
//! flows at a time, a relay after a burst of connections. Their freed
//! memory stayed with glibc (up to [`KEEP_HEAP_TOP`] per heap and the free
//! blocks inside it: an edge 13 → 14.2 MiB after 10,000 flows, all of it
//! returned by a `malloc_trim` by hand). So a second trigger
//! ([`FallTracker`]) trims when the live task count has halved within the
//! last [`FALL_WINDOW`] samples, by at least [`FALL_TASKS`], and the
//! resident set has grown by [`RSS_GROWTH`] since the last trim; at most
//! once every [`MIN_TRIM_GAP`] samples. A steady load (bulk,
//! request/response) never halves its task count, so it never trims; a
//! process that grew because it holds more (sessions) trims once for
//! nothing and then measures from there. Not glibc's own count of free
//! bytes (`mallinfo2`): pages a trim returned stay counted as free, and
//! when the next load touches them again the count does not grow, the
//! resident set does (tried: the second of two equal loads was never
//! trimmed).

use std::collections::VecDeque;
use std::time::Duration;

use tracing::info;

/// Live tasks a peak must exceed the count after it by before a trim is
/// worth its cost (each connection or stream is at least one task).
pub const PEAK_TASKS: usize = 512;

/// How often the live task count is sampled.
const SAMPLE: Duration = Duration::from_secs(1);

/// Tracks the live task count's highest value since the last trim.
#[derive(Debug, Default)]
pub struct PeakTracker {
    /// The highest count since the last trim (or the start).
    peak: usize,
}

impl PeakTracker {
    /// Takes one sample; `true` when the load has fallen far enough from
    /// its peak that a trim should run now.
    pub fn sample(&mut self, live: usize) -> bool {
        self.peak = self.peak.max(live);
        let fallen = self.peak >= live + PEAK_TASKS && live <= self.peak / 4;
        if fallen {
            // The next trim needs the load to fall that far again from
            // here (or from a new peak).
            self.peak = live;
        }
        fallen
    }
}

/// Samples the live task count is compared over for a fall.
pub const FALL_WINDOW: usize = 10;

/// Live tasks a fall must drop by (besides halving) to count.
pub const FALL_TASKS: usize = 64;

/// Growth of the resident set (KiB) since the last trim that makes a
/// fallen load worth a trim.
pub const RSS_GROWTH: u64 = 256;

/// Samples between two trims of a fallen load, at least.
pub const MIN_TRIM_GAP: u32 = 3;

/// The second trigger: a load that fell without a peak (see the module
/// docs). Pure bookkeeping; the caller samples and trims.
#[derive(Debug, Default)]
pub struct FallTracker {
    /// The last [`FALL_WINDOW`] samples, newest last.
    recent: VecDeque<usize>,
    /// Resident set (KiB) right after the last trim (0 before the first).
    rss_after_trim: u64,
    /// Samples since the last trim.
    since_trim: u32,
}

impl FallTracker {
    /// Takes one sample of the live task count; `true` when the load has
    /// fallen (halved within the window, by at least [`FALL_TASKS`]) and
    /// the last trim is [`MIN_TRIM_GAP`] samples ago: then the caller asks
    /// [`FallTracker::worth_trim`] with the resident set.
    pub fn fallen(&mut self, live: usize) -> bool {
        if self.recent.len() == FALL_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(live);
        self.since_trim = self.since_trim.saturating_add(1);
        let high = self.recent.iter().copied().max().unwrap_or(0);
        self.since_trim >= MIN_TRIM_GAP && high >= live + FALL_TASKS && live <= high / 2
    }

    /// Whether a resident set of `rss_kib` is [`RSS_GROWTH`] more than
    /// right after the last trim.
    pub fn worth_trim(&self, rss_kib: u64) -> bool {
        rss_kib >= self.rss_after_trim.saturating_add(RSS_GROWTH)
    }

    /// Records a trim (of either trigger) that left `rss_kib`.
    pub fn trimmed(&mut self, rss_kib: u64) {
        self.rss_after_trim = rss_kib;
        self.since_trim = 0;
    }
}

/// Spawns the trimmer on the current tokio runtime: it samples the
/// runtime's live task count every second and returns free heap pages to
/// the system once a peak has passed ([`PeakTracker`]) or a smaller load
/// has fallen and left free memory behind ([`FallTracker`]). Lives as long
/// as the runtime.
pub fn spawn_trim_after_peaks() {
    let handle = tokio::runtime::Handle::current();
    tokio::spawn(async move {
        let mut peaks = PeakTracker::default();
        let mut falls = FallTracker::default();
        let mut tick = tokio::time::interval(SAMPLE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let live = handle.metrics().num_alive_tasks();
            // Both see every sample; the resident set is read only when
            // one of them may trim.
            let peak_over = peaks.sample(live);
            let fallen = falls.fallen(live);
            if !(peak_over || fallen) {
                continue;
            }
            let before = rss_kib();
            let why = if peak_over {
                "load peak over"
            } else if fallen && before.is_some_and(|r| falls.worth_trim(r)) {
                "load fell"
            } else {
                continue;
            };
            let took = trim_on_own_thread().await;
            // malloc_trim cannot shrink the worker threads' heaps from
            // their top; each worker does that itself at its next park.
            request_worker_heap_shrink();
            let after = rss_kib();
            falls.trimmed(after.unwrap_or(0));
            if let (Some(took), Some(before), Some(after)) = (took, before, after) {
                info!(
                    live_tasks = live,
                    rss_before_kib = before,
                    rss_after_kib = after,
                    took_ms = took.as_millis() as u64,
                    "{why}: free heap memory returned to the system"
                );
            }
        }
    });
}

/// Runs [`trim`] on a thread of its own that ends with it; how long the
/// trim took (`None` if no thread could be started).
///
/// Not `spawn_blocking`: tokio keeps a blocking-pool thread alive for 10 s
/// after its last job, so every trim left the process one thread above
/// its baseline for a while (a soak settled 5 s after a peak counted it:
/// relay and edge threads 3 → 4). A trim runs a few times per peak at
/// most, so a thread per trim costs nothing that matters.
async fn trim_on_own_thread() -> Option<Duration> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(move || {
            let _ = tx.send(trim());
        })
        .ok()?;
    rx.await.ok()
}

/// Free memory glibc keeps at the top of each heap before giving it back
/// on its own (its default is 128 KiB, adjusted upwards at run time).
pub const KEEP_HEAP_TOP: usize = 4 << 20;

/// Lets each malloc heap keep [`KEEP_HEAP_TOP`] bytes free at its top
/// instead of handing every freed stretch back at once.
///
/// Why: a bulk stream reads 64 KiB chunks that the QUIC stream frees when
/// the peer acknowledges them. With glibc's default threshold the worker
/// threads' heaps shrank (`madvise`) and grew again (a page fault per
/// 4 KiB, in the kernel's copy of the next TCP read) all the time: 6 % of
/// the relay's CPU during `loadtest bulk` in a `perf` profile, 1 % of the
/// edge's; with a 4 MiB threshold none (1 MiB still left 1.6 %). What it
/// costs: up to 4 MiB kept per heap between peaks. The trim after a peak
/// ([`spawn_trim_after_peaks`]) returns the main heap's, and the free
/// blocks inside every heap, but not the free space at the end of a
/// worker thread's heap: glibc's `malloc_trim` never shrinks those heaps,
/// which shrink only at a free in them once that space exceeds this
/// threshold. Measured on a relay after `loadtest soak --phases
/// badinput`: 3.5 to 6.7 MiB held that way in its two workers' heaps, a
/// trim by hand returning 36 kB to 3.6 MiB (docs/benchmarks.md, "Soak").
/// So each trim also has every runtime worker shrink its own heap at its
/// next park ([`on_park`]), with the threshold lowered for that moment
/// only. Call once, early.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_heap_top() {
    // SAFETY: mallopt only sets a tuning parameter of the allocator under
    // its lock; valid at any time (glibc mallopt(3)). Setting it also fixes
    // the mmap threshold at its 128 KiB default (no dynamic adjustment).
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_HEAP_TOP as libc::c_int);
    }
}

/// Other C libraries have no such parameter.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_heap_top() {}

/// Trim threshold a worker sets for the moment it shrinks its own heap
/// ([`on_park`]): glibc's default, so everything above it goes back.
pub const SHRINK_HEAP_TOP: usize = 128 << 10;

/// Size of the block a worker frees to make glibc look at its heap's top:
/// at least `FASTBIN_CONSOLIDATION_THRESHOLD` (64 KiB), below which a free
/// never trims, and below the mmap threshold (128 KiB, fixed by
/// [`keep_heap_top`]), above which the block would be mapped on its own
/// and not come from the thread's heap at all.
pub const SHRINK_BLOCK: usize = 64 << 10;

/// Generation of worker-heap shrinks asked for: bumped by the trimmer each
/// time it trims ([`request_worker_heap_shrink`]); each worker shrinks its
/// heap once per generation ([`on_park`]).
static SHRINK_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// The last generation this thread has shrunk its heap for.
    static SHRUNK_FOR: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Asks every runtime worker to shrink its own malloc heap at its next
/// park ([`on_park`]).
pub fn request_worker_heap_shrink() {
    SHRINK_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The runtime's park hook (`tokio::runtime::Builder::on_thread_park`):
/// once after each trim, the worker gives the free space at the top of
/// its own malloc heap back to the system.
///
/// Why here: glibc gives each thread an arena of its own (sticky to the
/// thread) whose heap is a mapping that shrinks from its top only inside
/// `free`, in the thread using it: a freed (coalesced) chunk of at least
/// 64 KiB makes `_int_free` call `heap_trim`, which returns the top chunk
/// beyond the padding only once it is at least `M_TRIM_THRESHOLD`.
/// `malloc_trim` returns free pages inside every heap but never shrinks a
/// non-main heap from its top, and [`keep_heap_top`] lets that top hold
/// up to [`KEEP_HEAP_TOP`] (for bulk throughput), so after a burst each
/// worker kept up to 4 MiB (relay after `loadtest soak --phases badinput`:
/// 3.5 to 6.7 MiB in its two workers' heaps, docs/benchmarks.md). Only the
/// worker itself can make its heap shrink, and parking is when it has
/// nothing else to do. What it does, once per trim: under a process-wide
/// lock (the threshold is global; two workers must not restore it under
/// each other), lower the threshold to [`SHRINK_HEAP_TOP`], allocate and
/// free one [`SHRINK_BLOCK`], restore [`KEEP_HEAP_TOP`]. Between trims
/// (steady bulk never trims) the cost per park is one relaxed atomic load
/// and a thread-local compare.
pub fn on_park() {
    let generation = SHRINK_GENERATION.load(std::sync::atomic::Ordering::Relaxed);
    if SHRUNK_FOR.with(|seen| due(seen, generation)) {
        shrink_own_heap();
        #[cfg(test)]
        record_shrink();
    }
}

/// Whether a thread that last shrank for `seen` should shrink for
/// `generation` (recording that it does).
fn due(seen: &std::cell::Cell<u64>, generation: u64) -> bool {
    if seen.get() == generation {
        return false;
    }
    seen.set(generation);
    true
}

/// Heap shrinks done by [`on_park`]: thread and generation (tests).
#[cfg(test)]
static SHRINKS: std::sync::Mutex<Vec<(std::thread::ThreadId, u64)>> =
    std::sync::Mutex::new(Vec::new());

/// Shrinks the calling thread's malloc heap from its top (see
/// [`on_park`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn shrink_own_heap() {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // Byte-aligned: std's System allocator takes it from plain malloc.
    let layout = std::alloc::Layout::new::<[u8; SHRINK_BLOCK]>();
    // SAFETY: mallopt only sets a tuning parameter under the allocator's
    // lock (glibc mallopt(3)); the block is allocated with a non-zero
    // size, checked for null, and freed with the same layout.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, SHRINK_HEAP_TOP as libc::c_int);
        let block = std::alloc::alloc(layout);
        if !block.is_null() {
            // Not optimised away: the free is what trims.
            std::alloc::dealloc(std::hint::black_box(block), layout);
        }
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_HEAP_TOP as libc::c_int);
    }
}

/// Other C libraries: nothing to shrink this way.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn shrink_own_heap() {}

#[cfg(test)]
fn record_shrink() {
    let generation = SHRUNK_FOR.with(|s| s.get());
    SHRINKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((std::thread::current().id(), generation));
}

/// Returns free pages of every malloc arena to the system; how long it
/// took.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> Duration {
    let start = std::time::Instant::now();
    // SAFETY: malloc_trim takes a padding size, touches only the
    // allocator's own free lists under the arenas' locks, and is safe to
    // call from any thread at any time (glibc malloc(3)).
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
    start.elapsed()
}

/// Other C libraries (musl) return memory themselves or have no trim.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> Duration {
    Duration::ZERO
}

/// Tables below this many slots are never shrunk: too small to matter,
/// and a table that small is cheap to grow again.
pub const SHRINK_MIN_CAPACITY: usize = 64;

/// Shrinks a map that a burst left mostly empty. A `HashMap` keeps the
/// table of its largest size after entries are removed: an edge's UDP flow
/// table that once held 10,000 flows kept ~280 KB with none (the one
/// difference a heap profile found between an edge after 10,000 flows and
/// after one). Called after removals: once fewer than a quarter of the
/// slots are used, the table is rebuilt at twice its entries, so a table
/// that grows and shrinks around one size does not rebuild each time
/// (growing doubles it, shrinking needs it to fall to a quarter).
pub fn shrink_sparse<K, V, S>(map: &mut std::collections::HashMap<K, V, S>)
where
    K: Eq + std::hash::Hash,
    S: std::hash::BuildHasher,
{
    if map.capacity() > SHRINK_MIN_CAPACITY && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

/// The process's resident set, KiB (`VmRSS` of `/proc/self/status`).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_maps_shrink_and_full_ones_do_not() {
        let mut m: std::collections::HashMap<u32, u64> = (0..10_000).map(|i| (i, 0)).collect();
        // Removing down to half: still more than a quarter used, kept
        // (`capacity` counts free slots, which removals may leave
        // unusable until a rebuild, so it only stays large).
        m.retain(|k, _| *k < 5_000);
        shrink_sparse(&mut m);
        assert!(m.capacity() > 10_000, "capacity {} at half", m.capacity());
        // Down to 100 entries: rebuilt small, every entry kept.
        m.retain(|k, _| *k < 100);
        shrink_sparse(&mut m);
        assert!(
            m.capacity() < 400,
            "capacity {} after shrinking",
            m.capacity()
        );
        assert!(m.capacity() >= 200);
        assert!((0..100).all(|k| m.contains_key(&k)));
        // Empty: down to nothing beyond the minimum.
        m.clear();
        shrink_sparse(&mut m);
        assert!(m.capacity() <= SHRINK_MIN_CAPACITY);
        // Small tables are left alone.
        let mut small: std::collections::HashMap<u32, u64> = (0..40).map(|i| (i, 0)).collect();
        let cap = small.capacity();
        small.clear();
        shrink_sparse(&mut small);
        assert_eq!(small.capacity(), cap);
    }

    #[test]
    fn trims_once_per_peak_after_the_load_falls() {
        let mut t = PeakTracker::default();
        // Steady small load: never.
        assert!(!(0..10).any(|_| t.sample(20)));
        // A peak, still high: not yet.
        assert!(!t.sample(5_000));
        assert!(!t.sample(3_000));
        // Fallen to a quarter of the peak: once.
        assert!(t.sample(1_000));
        assert!(!t.sample(900));
        // Falling on by another quarter and 512: once more.
        assert!(t.sample(20));
        assert!(!t.sample(20));
        // A peak too small to be worth a trim.
        assert!(!t.sample(400));
        assert!(!t.sample(20));
        // The next real peak trims again.
        assert!(!t.sample(2_000));
        assert!(t.sample(30));
    }

    #[test]
    fn trims_after_a_fall_that_left_free_memory() {
        let mut t = FallTracker::default();
        const MIB: u64 = 1024;
        // A steady load, small or large, never falls.
        assert!(!(0..20).any(|_| t.fallen(20)));
        assert!(!(0..20).any(|_| t.fallen(800)));
        // Halved, but by fewer than FALL_TASKS: no.
        let mut small = FallTracker::default();
        assert!(!(0..5).any(|_| small.fallen(100)));
        assert!(!small.fallen(40));
        // 800 -> 11: fallen, for as long as the window holds the 800s.
        assert!(t.fallen(11));
        // The first trim: any resident set is worth it.
        assert!(t.worth_trim(5 * MIB));
        t.trimmed(5 * MIB);
        // Right after a trim: not before MIN_TRIM_GAP samples.
        assert!(!t.fallen(11));
        assert!(!t.fallen(11));
        assert!(t.fallen(11));
        // ... and only if the resident set grew RSS_GROWTH since.
        assert!(!t.worth_trim(5 * MIB + RSS_GROWTH - 1));
        assert!(t.worth_trim(5 * MIB + RSS_GROWTH));
        // Once the window has forgotten the high samples: no longer fallen.
        assert!(!(0..FALL_WINDOW).all(|_| t.fallen(11)));
        assert!(!t.fallen(11));
    }

    #[test]
    fn a_shrink_is_due_once_per_generation() {
        let seen = std::cell::Cell::new(0);
        // Nothing asked for yet: nothing to do, however often it parks.
        assert!(!due(&seen, 0));
        assert!(!due(&seen, 0));
        // A trim: once.
        assert!(due(&seen, 1));
        assert!(!due(&seen, 1));
        // Several trims while the thread was busy: still once.
        assert!(due(&seen, 4));
        assert!((0..100).all(|_| !due(&seen, 4)));
    }

    /// The one test that asks for shrinks (the generation is global).
    #[test]
    fn each_worker_shrinks_its_heap_once_per_trim() {
        const WORKERS: usize = 2;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .enable_all()
            .on_thread_park(on_park)
            .build()
            .expect("runtime");
        // Keeps both workers busy for a while, so that each runs (and
        // parks after) some of the tasks.
        let work = || {
            rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        tokio::spawn(async {
                            std::thread::sleep(Duration::from_millis(2));
                            tokio::task::yield_now().await;
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("task");
                }
            })
        };
        let ours = |generation: u64| {
            let shrinks = SHRINKS.lock().unwrap_or_else(|e| e.into_inner());
            shrinks
                .iter()
                .filter(|(_, g)| *g == generation)
                .map(|(t, _)| *t)
                .collect::<Vec<_>>()
        };
        // Parking before any trim shrinks nothing.
        work();
        let before = SHRINK_GENERATION.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(before, 0, "no other test asks for shrinks");
        assert!(SHRINKS.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
        for generation in [before + 1, before + 2] {
            request_worker_heap_shrink();
            assert_eq!(
                SHRINK_GENERATION.load(std::sync::atomic::Ordering::Relaxed),
                generation
            );
            // Every worker parks again sooner or later: once each.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while ours(generation).len() < WORKERS && std::time::Instant::now() < deadline {
                work();
            }
            // More parks: no second shrink for the same trim.
            for _ in 0..5 {
                work();
            }
            let mut threads = ours(generation);
            assert_eq!(threads.len(), WORKERS, "shrinks for {generation}");
            threads.sort_by_key(|t| format!("{t:?}"));
            threads.dedup();
            assert_eq!(threads.len(), WORKERS, "one shrink per worker");
        }
    }

    /// Resident KiB of the mapping holding `addr` (`/proc/self/smaps`).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn resident_kib_around(addr: usize) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
            if inside && line.starts_with("Rss:") {
                return line.split_whitespace().nth(1)?.parse().ok();
            }
        }
        None
    }

    /// A thread of its own gets a malloc arena of its own (a heap mapped
    /// apart from the main heap); freed blocks below the 4 MiB threshold
    /// stay resident at its top, a malloc_trim leaves them, the shrink
    /// returns them.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_shrink_returns_the_top_of_the_threads_heap() {
        keep_heap_top();
        std::thread::spawn(|| {
            const BLOCK: usize = 96 << 10; // from the heap, not mmap
            const BLOCKS: usize = 32; // 3 MiB, below KEEP_HEAP_TOP
            let blocks: Vec<Vec<u8>> = (0..BLOCKS).map(|i| vec![i as u8 | 1; BLOCK]).collect();
            // An address in the thread's heap (a small probe block may come
            // from elsewhere: seen from the main heap).
            let at = blocks[BLOCKS - 1].as_ptr() as usize;
            let full = resident_kib_around(at).expect("heap mapping");
            assert!(full >= 3 * 1024, "{full} KiB resident with 3 MiB in use");
            drop(blocks);
            let freed = resident_kib_around(at).expect("heap mapping");
            // The freed blocks are the top chunk now, kept (4 MiB
            // threshold); malloc_trim does not shrink a thread's heap from
            // its top.
            let _ = trim();
            let trimmed = resident_kib_around(at).expect("heap mapping");
            shrink_own_heap();
            let shrunk = resident_kib_around(at).expect("heap mapping");
            eprintln!(
                "thread heap: {full} KiB in use, {freed} KiB freed, {trimmed} KiB after malloc_trim, {shrunk} KiB after the shrink"
            );
            assert!(
                trimmed >= 3 * 1024 - 256,
                "malloc_trim returned the top ({freed} -> {trimmed} KiB)"
            );
            assert!(
                shrunk + 2 * 1024 < trimmed,
                "the shrink left {shrunk} KiB of {trimmed} KiB"
            );
        })
        .join()
        .expect("measuring thread");
    }

    #[test]
    fn the_process_rss_is_readable_and_a_trim_runs() {
        let before = rss_kib().expect("VmRSS in /proc/self/status");
        assert!(before > 0);
        // Whatever it returns, it must not disturb live allocations.
        let kept = vec![7u8; 1 << 20];
        let _ = trim();
        assert!(kept.iter().all(|&b| b == 7));
    }
}
