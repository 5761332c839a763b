//! What every strait binary's command line shares: parsing with
//! sysexits-style exit codes, the logging flags and set-up, the one line a
//! server logs when it is ready, durations.

use std::process::ExitCode;

/// Exit code for a command-line usage error (sysexits `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

/// Exit code for a failed operation (bad input file, failed verification).
pub const EXIT_FAILURE: u8 = 1;

/// Parses the command line; help and version go to stdout with exit 0,
/// usage errors to stderr with exit 64.
pub fn parse<T: clap::Parser>() -> Result<T, ExitCode> {
    T::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(EXIT_USAGE)
        } else {
            ExitCode::SUCCESS
        }
    })
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// Logging flags every command shares. Filters come from `RUST_LOG`.
#[derive(Debug, clap::Args)]
pub struct LogArgs {
    /// Log line format (logs go to stderr; filter with RUST_LOG, e.g. RUST_LOG=strait=debug).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "plain",
        env = "STRAIT_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

impl LogArgs {
    pub fn init(&self) {
        use tracing_subscriber::EnvFilter;
        // Quiet by default, but a server says once that it is ready and
        // where it listens.
        let filter = EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(format!("warn,{READY_TARGET}=info")));
        use std::io::IsTerminal;
        // Colours only for a person at a terminal, never in log files.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .with_writer(std::io::stderr);
        match self.log_format {
            LogFormat::Plain => builder.init(),
            LogFormat::Json => builder.json().init(),
        }
    }
}

/// The log target of the one line a server writes when it is ready, with
/// the addresses it serves; shown at the default log level.
pub const READY_TARGET: &str = "strait::ready";

/// Logs `role`'s ready line (target [`READY_TARGET`]) once `ready` is
/// first true. `addrs` are (what, address) pairs; absent ones are left out.
pub fn announce_when_ready(
    ready: crate::http::Ready,
    role: &'static str,
    addrs: Vec<(&'static str, Option<String>)>,
) {
    let addrs: Vec<String> = addrs
        .into_iter()
        .filter_map(|(what, a)| a.map(|a| format!("{what} {a}")))
        .collect();
    tokio::spawn(async move {
        ready.wait().await;
        tracing::info!(target: READY_TARGET, "{role} ready: {}", addrs.join(", "));
    });
}

/// Parses durations: one or more `<number><unit>` with units `ms`, `s`, `m`, `h`,
/// `d`, `w` and `y` (365 days, so a one-year certificate ends on the same
/// time of day), e.g. `30m`, `24h`, `90d`, `10y`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    const EXPECTED: &str = "expected e.g. 250ms, 30m, 24h, 90d, 10y";
    let mut total_ms: u64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(format!("empty duration ({EXPECTED})"));
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("{s:?} is not a duration ({EXPECTED})"));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let millis: u64 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            "y" => 365 * 86_400_000,
            "" => return Err(format!("{s:?} needs a unit ({EXPECTED})")),
            other => return Err(format!("unknown unit {other:?} in {s:?} ({EXPECTED})")),
        };
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{number:?} in {s:?} is too large"))?;
        total_ms = n
            .checked_mul(millis)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(|| format!("{s:?} is too long"))?;
        rest = after;
    }
    if total_ms == 0 {
        return Err("must be longer than zero".to_string());
    }
    Ok(std::time::Duration::from_millis(total_ms))
}

/// Renders a duration in the largest unit that divides it (`365d`, `24h`).
pub fn format_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s >= size && s.is_multiple_of(size) {
            return format!("{}{unit}", s / size);
        }
    }
    format!("{s}s")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("10y"), Ok(Duration::from_secs(3650 * 86400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
        assert!(
            parse_duration("0s")
                .unwrap_err()
                .contains("longer than zero")
        );
        assert!(
            parse_duration("ten days")
                .unwrap_err()
                .contains("expected e.g.")
        );
        assert!(parse_duration("5").unwrap_err().contains("needs a unit"));
        assert!(
            parse_duration("5x")
                .unwrap_err()
                .contains("unknown unit \"x\"")
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1h").is_err());
        assert!(parse_duration("1h 30m").is_err());
        assert!(
            parse_duration("99999999999999999999y")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_duration("999999999999999y")
                .unwrap_err()
                .contains("too long")
        );
    }

    #[test]
    fn formatting() {
        assert_eq!(format_duration(Duration::from_secs(365 * 86400)), "365d");
        assert_eq!(format_duration(Duration::from_secs(86400)), "1d");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    }
}
