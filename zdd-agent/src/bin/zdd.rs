//! zdd: the command-line client of zdd-agent's control socket (see `zdd_agent::cli`).

fn main() -> std::process::ExitCode {
    zdd_agent::cli::main()
}
