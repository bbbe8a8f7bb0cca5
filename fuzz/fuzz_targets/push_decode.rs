//! The config-push frames on arbitrary bytes: `PushFrame` (what an agent reads) and
//! `AgentFrame` (what the controller reads) never panic to decode, and a decoded update
//! applied to an empty and to a populated agent state never panics either (the agent's
//! apply is the second parser of network input).
#![no_main]

use causeway_api::push::{
    AgentFrame, ConfigUpdate, MAX_PUSH_FRAME, MeshState, PushFrame, push_frame,
};
use causeway_api::wire::decode_frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame::<AgentFrame>(data, MAX_PUSH_FRAME);
    if let Ok(PushFrame {
        kind: Some(push_frame::Kind::Update(update)),
    }) = decode_frame::<PushFrame>(data, MAX_PUSH_FRAME)
    {
        let empty = MeshState::default();
        let _ = empty.apply(&update);
        let base = ConfigUpdate {
            version: 1,
            full: true,
            vip_cidr: "240.240.0.0/16".into(),
            ..ConfigUpdate::default()
        };
        if let Ok(populated) = empty.apply(&base).map(|a| a.state)
            && let Ok(next) = populated.apply(&update).map(|a| a.state)
        {
            // An applied state never goes backwards for a delta.
            assert!(update.full || next.version > populated.version);
        }
    }
});
