fn main() -> std::process::ExitCode {
    vigil_monitor::cli::main()
}
