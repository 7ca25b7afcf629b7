//! Reading samples out of a Prometheus `/metrics` text. Shared with the
//! agent's tests, which include this file by path.

/// The value of the sample line `name_and_labels` (e.g. `x_total` or
/// `x_total{route="files"}`), if there is one.
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}
