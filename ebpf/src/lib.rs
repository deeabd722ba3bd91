//! kiln-ebpf: the pipeline observer's BPF programs and the `#[repr(C)]` mirrors of their events.
//!
//! Empty until the observer lands: the C CO-RE sources will live in `src/bpf/`, the shared
//! event header in `src/bpf/events.h`, and `build.rs` will compile and embed them.
