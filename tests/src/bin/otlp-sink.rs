//! A counting OTLP sink for `cargo xtask bench`: prints its endpoints, then on each line read
//! from stdin prints the number of spans received so far. Ends at EOF.

use std::io::BufRead as _;

fn main() {
    let receiver = loupe_tests::otlp::Receiver::start_counting();
    println!(
        "grpc=http://{} http=http://{}",
        receiver.grpc, receiver.http
    );
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        println!("{}", receiver.counted());
    }
}
