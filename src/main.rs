fn main() {
    std::process::exit(vpool::cli::main());
}
