//! The ARCUS operator: the `ArcusMemcached` resource and the controller that runs it.
//!
//! Pipeline (see `controller`): read the world → `validate` → `zk_plan` and `build` (pure) →
//! apply at the edge (`zk`, server-side apply) → `status`.

pub mod build;
pub mod controller;
pub mod crd;
pub mod day2;
pub mod leader;
pub mod metrics;
pub mod migrate;
pub mod migration;
pub mod operation;
pub mod status;
pub mod validate;
pub mod zk;
pub mod zk_auth;
pub mod zk_plan;
