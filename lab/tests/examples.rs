//! The example configurations in `deploy/examples/` must parse with the
//! real config parsers (and pass every check that does not need the
//! certificate files to exist), so the documentation stays true.

use std::path::Path;

fn read(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn relay_example_parses_and_validates_up_to_the_certificates() {
    let f = relay_server::FileConfig::parse(&read("relay.toml")).expect("relay.toml parses");
    assert_eq!(f.nodes.len(), 2);
    assert_eq!(f.tunnel_routes.len(), 2);
    // Everything but the (absent) certificate files validates: the first
    // error is about [tls].
    let e = f.into_runtime().unwrap_err();
    assert_eq!(e.field, "tls", "{e}");
}

#[test]
fn edge_example_parses_and_validates_up_to_the_certificates() {
    let f = edge_client::FileConfig::parse(&read("edge.toml")).expect("edge.toml parses");
    assert_eq!(f.node, "edge-1");
    let e = f.into_runtime().unwrap_err();
    assert_eq!(e.field, "tls", "{e}");
}
