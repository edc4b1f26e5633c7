//! Prints the InferencePool CRD as YAML: `cargo run -p pdfleet-crds --bin crdgen > crds/inferencepool.yaml`.
fn main() {
    print!("{}", pdfleet_crds::crd_yaml());
}
