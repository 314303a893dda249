//! The ring against an independent reference: `ketama_reference.py` (Python's hashlib, written
//! from the ARCUS spec) computes each key's hash and owner; ours must agree on every key.

use arcus_client::ring::{ketama_hash, Ring};
use std::io::Write;
use std::process::{Command, Stdio};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ketama_reference.py");

fn python(args: &[&str], stdin: &str) -> String {
    let mut child = Command::new("python3")
        .arg(SCRIPT)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_string();
    let writer = std::thread::spawn(move || input.write_all(stdin.as_bytes()));
    let out = child.wait_with_output().expect("reference script finishes");
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "reference script failed: {:?}",
        out.status
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Keys of many shapes: plain, ARCUS prefix:key, numeric, long, non-ASCII.
fn keys() -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..4000 {
        keys.push(match i % 5 {
            0 => format!("key-{i}"),
            1 => format!("user:{i}"),
            2 => format!("{i}"),
            3 => format!("prefix{}:item-{}-{}", i % 17, i, "x".repeat(i % 300)),
            _ => format!("키-{i}-ключ-{}", i * 7919),
        });
    }
    keys.push("kubernetes:arcus".into());
    keys
}

fn assert_same_as_reference(nodes: &[&str]) {
    let keys = keys();
    let ring = Ring::new(nodes.iter().copied());
    let mut args = vec!["owners"];
    args.extend(nodes);
    let reference = python(&args, &(keys.join("\n") + "\n"));
    let lines: Vec<&str> = reference.lines().collect();
    assert_eq!(lines.len(), keys.len());
    let mut per_node = std::collections::BTreeMap::<&str, usize>::new();
    for (key, line) in keys.iter().zip(lines) {
        let (hash, owner) = line.split_once(' ').unwrap();
        assert_eq!(
            ketama_hash(key.as_bytes()).to_string(),
            hash,
            "hash of {key:?}"
        );
        let ours = ring.node_for_key(key).unwrap();
        assert_eq!(ours, owner, "owner of {key:?} on {nodes:?}");
        *per_node.entry(ours).or_default() += 1;
    }
    // Every node gets a share of the keys.
    assert_eq!(per_node.len(), nodes.len(), "{per_node:?}");
}

#[test]
fn one_node() {
    assert_same_as_reference(&["127.1.0.2:11211"]);
}

#[test]
fn three_nodes() {
    assert_same_as_reference(&["127.1.0.2:11211", "127.1.0.3:11211", "127.1.0.4:11211"]);
}

#[test]
fn five_nodes() {
    assert_same_as_reference(&[
        "10.34.33.81:11211",
        "10.34.33.82:11211",
        "10.34.33.83:11211",
        "10.34.33.84:11212",
        "192.168.0.10:11211",
    ]);
}

#[test]
fn five_nodes_from_cache_list_names() {
    let children = [
        "127.1.0.9:11211-test-arcus-mc-4",
        "127.1.0.5:11211-test-arcus-mc-0",
        "127.1.0.6:11211-test-arcus-mc-1",
        "127.1.0.8:11211-test-arcus-mc-3",
        "127.1.0.7:11211-test-arcus-mc-2",
    ];
    let from_names = Ring::from_cache_list(children);
    assert_eq!(from_names.len(), 5);
    assert_eq!(
        from_names,
        Ring::new([
            "127.1.0.5:11211",
            "127.1.0.6:11211",
            "127.1.0.7:11211",
            "127.1.0.8:11211",
            "127.1.0.9:11211"
        ])
    );
    assert_same_as_reference(&[
        "127.1.0.5:11211",
        "127.1.0.6:11211",
        "127.1.0.7:11211",
        "127.1.0.8:11211",
        "127.1.0.9:11211",
    ]);
}

/// Two nodes whose rings share a point: the Java client routes that point to the
/// lexicographically smaller address, whatever the insertion order.
#[test]
fn colliding_points_go_to_the_smaller_address() {
    let out = python(&["collide"], "");
    let f: Vec<&str> = out.split_whitespace().collect();
    let (a, b, point, winner) = (f[0], f[1], f[2].parse::<u32>().unwrap(), f[3]);
    for nodes in [[a, b], [b, a]] {
        let ring = Ring::new(nodes);
        assert_eq!(ring.node_for_hash(point), Some(winner));
        // One point is shared, so the continuum has one point less than 2 x 160.
        assert_eq!(ring.points().count(), 319);
    }
    assert_same_as_reference(&[a, b]);
    assert_same_as_reference(&[b, a, "10.9.9.9:11211"]);
}
