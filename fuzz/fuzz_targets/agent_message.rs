//! Frames an agent sends, as the control plane receives them: any bytes
//! decode or are refused without a panic, and what is accepted is bounded
//! and well-formed before it reaches the store or an operator's screen.

#![no_main]

use libfuzzer_sys::fuzz_target;
use procurator_control_plane::received;
use procurator_core::StorePath;
use procurator_core::limits::{
    MAX_AGENT_STRING_BYTES, MAX_LABELS, MAX_OUTPUT_TAIL_BYTES, MAX_REASON_BYTES,
};
use procurator_proto::v1::{AgentMessage, agent_message};
use prost::Message as _;

fn system_or_empty(path: &str) -> bool {
    path.is_empty() || StorePath::parse(path).is_ok()
}

fuzz_target!(|data: &[u8]| {
    let Ok(message) = AgentMessage::decode(data) else {
        return;
    };
    match message.kind {
        Some(agent_message::Kind::Hello(mut hello)) => {
            if received::hello(&mut hello).is_ok() {
                assert!(system_or_empty(&hello.current_system));
                assert!(system_or_empty(&hello.booted_system));
                assert!(hello.agent_version.len() <= MAX_AGENT_STRING_BYTES);
                assert!(hello.nix_version.len() <= MAX_AGENT_STRING_BYTES);
                if let Some(capacity) = &hello.vm_host {
                    assert!(capacity.vmm.len() <= MAX_AGENT_STRING_BYTES);
                    assert!(capacity.labels.len() <= MAX_LABELS);
                    assert!(
                        capacity
                            .labels
                            .iter()
                            .all(|l| l.len() <= MAX_AGENT_STRING_BYTES)
                    );
                }
            }
        }
        Some(agent_message::Kind::Progress(mut progress)) => {
            received::progress(&mut progress);
            assert!(progress.message.len() <= MAX_REASON_BYTES);
        }
        Some(agent_message::Kind::Result(mut result)) => {
            received::result(&mut result);
            assert!(result.reason.len() <= MAX_REASON_BYTES);
            assert!(result.reboot_reason.len() <= MAX_AGENT_STRING_BYTES);
            assert!(result.output_tail.len() <= MAX_OUTPUT_TAIL_BYTES);
            assert!(system_or_empty(&result.current_system));
        }
        Some(agent_message::Kind::Heartbeat(heartbeat)) => {
            let system = received::heartbeat_system(heartbeat.current_system);
            assert!(system_or_empty(&system));
        }
        _ => {}
    }
});
