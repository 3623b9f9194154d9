//! Evaluation harness for the embedded MQTT broker of `outpost-server`.
//!
//! Each candidate broker runs in a child process (`broker-eval serve ...`) so that
//! memory can be read from `/proc`, and restarts kill a real process. The criteria in
//! [`criteria`] talk to it through rumqttc 0.25 only, so every broker is measured by
//! the same client code. Results and the recommendation are in `docs/broker.md`.

pub mod common;
pub mod criteria;
#[cfg(feature = "rmqtt-broker")]
pub mod rmqtt_broker;
#[cfg(feature = "rumqttd-broker")]
pub mod rumqttd_broker;
