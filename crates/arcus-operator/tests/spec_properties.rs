//! Generated ArcusMemcached specs against `validate` (pure): it never panics, it accepts or
//! refuses every spec, and every refusal names the field (`spec.…` or `metadata.…`) so the
//! message in status and in the Event tells the user what to fix. 10,000 cases.
//!
//! The values mix valid ones with the edges `validate` checks (ranges, DNS labels, host:port
//! lists, image references, label maps) and plain garbage.

use arcus_operator::crd::ArcusMemcached;
use arcus_operator::validate;
use proptest::prelude::*;
use serde_json::{json, Value};

/// Mostly a valid value (so that most specs are accepted and the rest fail on one or two
/// fields), sometimes an edge or garbage.
fn mostly<T: std::fmt::Debug + Clone + 'static>(
    valid: impl Strategy<Value = T> + 'static,
    edge: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<T> {
    prop_oneof![6 => valid, 1 => edge].boxed()
}

fn edgy_int() -> impl Strategy<Value = i64> {
    prop_oneof![
        -2i64..70_000,
        Just(0),
        Just(-1),
        Just(i32::MAX as i64),
        Just(i32::MIN as i64),
        Just(65_535),
        Just(65_536),
        Just(2_000),
        Just(2_001),
    ]
}

fn garbage() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_.:/@-]{0,70}",
        ".{0,40}",
        Just(String::new()),
        Just("a".repeat(300)),
    ]
}

fn spec() -> impl Strategy<Value = Value> {
    let zk_server = mostly("zk-[0-9]\\.zk:2181".prop_map(String::from), garbage());
    let label_key = mostly("[a-z]{1,8}(/[a-z]{1,8})?".prop_map(String::from), garbage());
    let label_value = mostly("[a-z0-9]{0,10}".prop_map(String::from), garbage());
    (
        (
            mostly(0i64..20, edgy_int()),
            mostly("[a-z][a-z0-9_]{0,20}".prop_map(String::from), garbage()),
            mostly(
                prop::collection::vec(zk_server.clone(), 1..4),
                prop::collection::vec(zk_server, 0..12),
            ),
        ),
        (
            mostly(64i64..1024, edgy_int()),
            mostly(100i64..10_000, edgy_int()),
            mostly(1i64..16, edgy_int()),
            mostly(1_024i64..65_535, edgy_int()),
        ),
        (
            mostly(prop::option::of(10i64..2_000), prop::option::of(edgy_int())),
            mostly(Just("jam2in/arcus-memcached:1.11.7".to_string()), garbage()),
            any::<bool>(),
        ),
        (
            prop::collection::btree_map(label_key.clone(), label_value.clone(), 0..3),
            prop::collection::btree_map(label_key, label_value, 0..3),
            mostly("[a-z][a-z0-9]{0,10}".prop_map(String::from), garbage()),
        ),
    )
        .prop_map(
            |(
                (replicas, service_code, zk),
                (memlimit, connections, threads, port),
                (timeout, image, failstop),
                (labels, annotations, name),
            )| {
                let mut spec = json!({
                    "replicas": replicas, "serviceCode": service_code, "zookeeperServers": zk,
                    "configuration": {"memlimit": memlimit, "connections": connections, "threads": threads},
                    "image": {"name": image}, "port": port, "zkFailstop": failstop,
                    "podLabels": labels, "podAnnotations": annotations,
                });
                if let Some(t) = timeout {
                    spec["zkSessionTimeoutSeconds"] = json!(t);
                }
                json!({
                    "apiVersion": "jam2in.com/v1", "kind": "ArcusMemcached",
                    "metadata": {"name": name, "namespace": "ns", "uid": "u-1"},
                    "spec": spec,
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn validate_never_panics_and_names_the_field(doc in spec()) {
        // Values out of the schema's types (an i64 beyond i32) are the API server's to refuse.
        let Ok(cr) = serde_json::from_value::<ArcusMemcached>(doc) else {
            return Ok(());
        };
        if let Err(invalid) = validate::validate(&cr) {
            let message = invalid.to_string();
            prop_assert!(
                message.contains("spec.") || message.contains("metadata."),
                "a refusal that names no field: {message}"
            );
        }
    }
}
