//! The helixmq command line.
fn main() {
    println!("helixmq");
}
