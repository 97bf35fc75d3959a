//! deployment.json for simulated fleets (the swarm benchmark's agents, the
//! live-view test): machines `<prefix>-0..n`, each on a closure of its own
//! that exists nowhere (simulated agents copy nothing).

use serde_json::{Value, json};

/// deployment.json for machines `<prefix>-0..n`, each on its own closure of
/// generation `generation`, in one wave. `confirm_timeout` 0 turns the
/// connectivity confirmation off.
pub fn artifact(prefix: &str, n: usize, generation: u32, confirm_timeout: u32) -> Value {
    let mut blueprint = serde_json::Map::new();
    let mut closures = serde_json::Map::new();
    for i in 0..n {
        let name = format!("{prefix}-{i}");
        blueprint.insert(
            name.clone(),
            json!({
                "role": "worker",
                "cpu": 1.0,
                "memory": { "amount": 1.0, "unit": "GB" },
                "labels": ["swarm"],
                "replicas": 1,
                "deployment": { "addr": name, "backend": "nixos" },
            }),
        );
        closures.insert(
            name.clone(),
            json!(format!(
                "/nix/store/{}-nixos-system-{name}-{generation}",
                store_hash(i, generation)
            )),
        );
    }
    json!({
        "gitCommit": format!("{:08x}{:032x}", generation, unix_micros()),
        "blueprint": blueprint,
        "closures": closures,
        "rollout": { "maxInFlight": n, "confirmTimeout": confirm_timeout },
    })
}

/// 32 characters of Nix's base-32 alphabet, distinct per machine and generation.
fn store_hash(index: usize, generation: u32) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut x = (index as u64) << 32 | u64::from(generation);
    (0..32)
        .map(|_| {
            // splitmix64: spreads consecutive inputs over the alphabet.
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ALPHABET[((z ^ (z >> 31)) % 32) as usize] as char
        })
        .collect()
}

fn unix_micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}
