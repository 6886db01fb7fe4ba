//! A stand-in session for registry and route-feed tests.

use super::*;

/// A session with a node, a generation and the routes it registers.
#[derive(Debug)]
pub(crate) struct Fake {
    pub(crate) node: String,
    pub(crate) generation: u64,
    pub(crate) routes: Vec<Cidr>,
}

impl RouteOwner for Fake {
    fn node(&self) -> &str {
        &self.node
    }
    fn generation(&self) -> u64 {
        self.generation
    }
    fn session_id(&self) -> u64 {
        self.generation * 100
    }
}

/// Registers a fake with its own routes.
pub(crate) fn reg(
    r: &Registry<Fake>,
    f: Arc<Fake>,
    max: usize,
) -> Result<Option<Arc<Fake>>, RegisterError> {
    let routes = f.routes.clone();
    r.register(f, routes, max)
}
