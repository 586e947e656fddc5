//! The `outboxd` binary: only wires the command line to the library.

fn main() -> std::process::ExitCode {
    outboxd::cli::main()
}
