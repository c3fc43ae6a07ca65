#![forbid(unsafe_code)]
fn main() -> std::process::ExitCode {
    vigil_monitor::ctl::main()
}
