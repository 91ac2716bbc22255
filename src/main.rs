use clap::Parser;

fn main() {
    let cli = layervol::cli::Cli::parse();
    if let Err(e) = layervol::daemon::run(cli) {
        eprintln!("layervol: {e:#}");
        std::process::exit(1);
    }
}
