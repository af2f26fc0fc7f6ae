//! Names the overlay takes from outside (nodes, streams) and how much of a
//! refused value a message repeats.

/// Longest node or stream name taken.
pub const MAX_NAME: usize = 64;
/// How much of a rejected value an error or a log line shows.
const SHOWN: usize = 32;

/// At most [`SHOWN`] characters of `text`, marked when cut.
pub fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN) {
        Some((at, _)) => format!("{:?}… ({} bytes)", &text[..at], text.len()),
        None => format!("{text:?}"),
    }
}

/// Checks a node or stream name (`what` names it in the error): short, and
/// only letters, digits, `.`, `_` and `-`, so that it is safe in logs,
/// paths and URLs.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > MAX_NAME {
        return Err(format!("{what} {} is longer than {MAX_NAME} bytes", shown(name)));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(format!("{what} {} may hold only letters, digits, '.', '_' and '-'", shown(name)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_plain_and_errors_show_a_prefix() {
        assert!(check_name("stream", "live-1.cam_2").is_ok());
        assert_eq!(check_name("stream", "").unwrap_err(), "stream is empty");
        assert!(check_name("stream", "a b").unwrap_err().contains("may hold only"));
        let long = "x".repeat(1 << 20);
        let e = check_name("stream", &long).unwrap_err();
        assert!(e.len() < 120 && e.contains("(1048576 bytes)"), "{e}");
    }
}
