//! `kiln-sandbox`: runs one pipeline step in fresh namespaces. Spec (JSON) on stdin, outcome (one
//! JSON line) on stdout, the step log on stderr. Started by kilnd only; see `kilnd::sandbox::helper`.

fn main() -> std::process::ExitCode {
    kilnd::sandbox::helper::main()
}
