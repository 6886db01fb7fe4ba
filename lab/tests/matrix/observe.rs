//! What the matrix reads back from the lab to judge a cell: edge1's
//! session on the relay, the capture set of a node, the route agent's
//! routes on cloud2. One place each, so every phase reads them alike.

use anyhow::Result;
use relay_lab::netns::{NetnsLab, Role};
use relay_lab::scenario::admin;
use relay_server::admin::SessionRow;

/// edge1's session as the relay's admin API reports it (an error when it
/// has none or the answer does not parse).
pub(crate) fn edge1_session(lab: &NetnsLab) -> Result<SessionRow> {
    Ok(serde_json::from_str(&admin(lab, "/v1/sessions/edge1")?)?)
}

/// The IPv4 destinations `role`'s capture takes (its nftables set
/// `inet edge_relay dst4`, as `nft` lists it; empty without the table).
pub(crate) use relay_lab::scenario::capture_set;

/// The route agent's routes on cloud2.
pub(crate) fn agent_routes(lab: &NetnsLab) -> Result<String> {
    relay_lab::route_agent::routes(lab, Role::Cloud2)
}
