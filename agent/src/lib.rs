//! `outpost-agent`: what runs on every device.
