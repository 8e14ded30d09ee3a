fn main() {
    std::process::exit(copilot_ingest::cli::main());
}
