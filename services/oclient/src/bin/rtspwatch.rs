//! Watches an RTSP URL with GStreamer's rtspsrc, as any RTSP player
//! would, and reports the time to the first decoded frame and the frames
//! decoded, as JSON on standard output (and to --stats-json).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use media::RtspTransport;

#[derive(Parser)]
#[command(
    name = "rtspwatch",
    version,
    about = "Watch an RTSP stream with GStreamer's rtspsrc and report its start-up as JSON",
    long_about = "Watch an RTSP stream with GStreamer's rtspsrc and report its start-up as JSON.\n\nPlays URL (rtsp://POP:8554/STREAM) for --duration seconds, decoding its video, and prints {\"first_frame_ms\", \"frames_decoded\", \"error\"}: the time from the player's start (before its first request) to the first decoded frame. Exits 1 if no frame was decoded."
)]
struct Cli {
    /// rtsp://HOST:PORT/STREAM (a token goes in ?token=...).
    url: String,
    /// Take the media interleaved in the RTSP connection (RTP/AVP/TCP)
    /// instead of over UDP.
    #[arg(long)]
    tcp: bool,
    /// Seconds to watch.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Also write the JSON to this file.
    #[arg(long)]
    stats_json: Option<PathBuf>,
}

/// Set by SIGINT or SIGTERM: the player stops and tears its session down.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if !(cli.duration.is_finite() && cli.duration > 0.0 && cli.duration <= 86_400.0) {
        eprintln!("rtspwatch: --duration must be between 0 and 86400 seconds, not {}", cli.duration);
        return ExitCode::FAILURE;
    }
    let transport = if cli.tcp { RtspTransport::Tcp } else { RtspTransport::Udp };
    let watched = match media::watch_rtsp(&cli.url, transport, Duration::from_secs_f64(cli.duration), &STOP) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("rtspwatch: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = serde_json::json!({
        "url": cli.url,
        "transport": if cli.tcp { "tcp" } else { "udp" },
        "first_frame_ms": watched.first_frame_ms,
        "frames_decoded": watched.frames_decoded,
        "error": watched.error,
    });
    println!("{report}");
    if let Some(path) = &cli.stats_json {
        if let Err(e) = std::fs::write(path, report.to_string()) {
            eprintln!("rtspwatch: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if let Some(e) = &watched.error {
        eprintln!("rtspwatch: {e}");
    }
    if watched.frames_decoded == 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
