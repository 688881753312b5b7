//! `sagaflow-bench`: open-loop load against the booking orchestrator.

fn main() {
    eprintln!("sagaflow-bench: not built yet");
    std::process::exit(2);
}
