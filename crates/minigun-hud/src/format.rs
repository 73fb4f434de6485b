//! Short human forms of counts, rates, durations and sizes, for narrow table cells.

/// A count: exact below 10 000, then `12.3k`, `456k`, `7.89M`, `1.2G`.
pub(crate) fn count(n: u64) -> String {
    if n < 10_000 {
        return n.to_string();
    }
    scaled(n as f64, "")
}

/// Items per second: `0/s`, `3.5/s`, `120/s`, `1.2k/s`.
pub(crate) fn rate(r: f64) -> String {
    if !r.is_finite() || r <= 0.0 {
        "0/s".to_string()
    } else if r < 10.0 {
        format!("{r:.1}/s")
    } else if r < 10_000.0 {
        format!("{r:.0}/s")
    } else {
        format!("{}/s", scaled(r, ""))
    }
}

fn scaled(v: f64, unit: &str) -> String {
    let (v, suffix) = if v >= 1e9 {
        (v / 1e9, "G")
    } else if v >= 1e6 {
        (v / 1e6, "M")
    } else {
        (v / 1e3, "k")
    };
    if v < 10.0 {
        format!("{v:.2}{suffix}{unit}")
    } else if v < 100.0 {
        format!("{v:.1}{suffix}{unit}")
    } else {
        format!("{v:.0}{suffix}{unit}")
    }
}

/// A latency given in microseconds: `-` for none, `850µs`, `12.5ms`, `1.20s`.
pub(crate) fn micros(us: f64) -> String {
    if !us.is_finite() || us <= 0.0 {
        "-".to_string()
    } else if us < 1_000.0 {
        format!("{us:.0}µs")
    } else if us < 100_000.0 {
        format!("{:.1}ms", us / 1e3)
    } else if us < 1_000_000.0 {
        format!("{:.0}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

/// A duration in seconds: `4.2s`, `59s`, `3m05s`, `2h04m`.
pub(crate) fn secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "-".to_string();
    }
    if s < 10.0 {
        return format!("{s:.1}s");
    }
    let whole = s.round() as u64;
    if whole < 60 {
        format!("{whole}s")
    } else if whole < 3600 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60)
    }
}

/// A size in bytes: `-` for unknown, `512K`, `8.0M`, `1.25G`.
pub(crate) fn bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let v = b as f64;
    if b == 0 {
        "-".to_string()
    } else if v < K * K {
        format!("{:.0}K", (v / K).max(1.0))
    } else if v < K * K * K {
        let m = v / (K * K);
        if m < 100.0 {
            format!("{m:.1}M")
        } else {
            format!("{m:.0}M")
        }
    } else {
        format!("{:.2}G", v / (K * K * K))
    }
}

/// Cuts `s` to at most `width` characters, ending with `…` when cut.
pub(crate) fn fit(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        s.to_string()
    } else if width == 0 {
        String::new()
    } else {
        let mut out: String = s.chars().take(width - 1).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_rates_stay_short() {
        assert_eq!(count(9_999), "9999");
        assert_eq!(count(12_345), "12.3k");
        assert_eq!(count(456_789), "457k");
        assert_eq!(count(7_890_000), "7.89M");
        assert_eq!(rate(0.0), "0/s");
        assert_eq!(rate(3.46), "3.5/s");
        assert_eq!(rate(120.4), "120/s");
        assert_eq!(rate(12_345.0), "12.3k/s");
    }

    #[test]
    fn durations_latencies_and_sizes() {
        assert_eq!(secs(4.24), "4.2s");
        assert_eq!(secs(59.4), "59s");
        assert_eq!(secs(185.0), "3m05s");
        assert_eq!(secs(7440.0), "2h04m");
        assert_eq!(micros(0.0), "-");
        assert_eq!(micros(850.2), "850µs");
        assert_eq!(micros(12_500.0), "12.5ms");
        assert_eq!(micros(1_200_000.0), "1.20s");
        assert_eq!(bytes(0), "-");
        assert_eq!(bytes(512 * 1024), "512K");
        assert_eq!(bytes(8 << 20), "8.0M");
        assert_eq!(fit("render", 4), "ren…");
        assert_eq!(fit("ab", 4), "ab");
    }
}
