//! `outpost-server`: the fleet server and the operator tooling behind `outpostctl`.
