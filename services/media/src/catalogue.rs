//! Which streams a server offers: the built-in test stream and the media
//! files of a folder, each named by its file stem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::MediaError;

/// The name of the built-in test stream every server offers.
pub const TEST_STREAM: &str = "test";

/// File name extensions (lower case) of containers GStreamer can probably
/// read with the installed plugins.
const MEDIA_EXTENSIONS: &[&str] = &[
    "mp4", "m4v", "m4a", "mkv", "mka", "webm", "mov", "avi", "ts", "m2ts", "mts", "ogg", "ogv", "oga", "opus", "flv",
    "mpg", "mpeg", "3gp", "wav", "mp3", "flac", "aac",
];

/// Where a stream's media comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// Generated: a moving picture with a clock, and a tone.
    Test,
    /// A media file, looped forever.
    File(PathBuf),
}

/// The streams a server offers: [`TEST_STREAM`] plus every regular file in
/// `dir` with a media extension, named by its file stem. The test stream
/// keeps its name over a file called `test.*`; of two files with the same
/// stem the first in name order wins. Files whose stem is not UTF-8 are
/// skipped.
pub fn catalogue(dir: Option<&Path>) -> Result<BTreeMap<String, SourceSpec>, MediaError> {
    let mut streams = BTreeMap::from([(TEST_STREAM.to_owned(), SourceSpec::Test)]);
    let Some(dir) = dir else {
        return Ok(streams);
    };
    let directory_error = |source| MediaError::Directory { dir: dir.to_owned(), source };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(directory_error)? {
        let path = entry.map_err(directory_error)?.path();
        // metadata() follows symbolic links, so a link to a file counts.
        if path.metadata().is_ok_and(|m| m.is_file()) && has_media_extension(&path) {
            files.push(path);
        }
    }
    files.sort();
    for path in files {
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            warn!(file = %path.display(), "skipping media file whose name is not UTF-8");
            continue;
        };
        if let Some(taken) = streams.get(stem) {
            warn!(file = %path.display(), stream = stem, ?taken, "stream name already taken; skipping file");
            continue;
        }
        streams.insert(stem.to_owned(), SourceSpec::File(path));
    }
    Ok(streams)
}

fn has_media_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| MEDIA_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_directory_offers_only_the_test_stream() {
        let streams = catalogue(None).unwrap();
        assert_eq!(streams.len(), 1);
        assert_eq!(streams[TEST_STREAM], SourceSpec::Test);
    }

    #[test]
    fn files_are_named_by_stem_and_filtered_by_extension() {
        let dir = std::env::temp_dir().join(format!("media-catalogue-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub.mp4")).unwrap();
        for name in ["movie.MKV", "clip.mp4", "clip.webm", "notes.txt", "test.mp4", "noext"] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let streams = catalogue(Some(&dir)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let names: Vec<&str> = streams.keys().map(String::as_str).collect();
        assert_eq!(names, ["clip", "movie", "test"]);
        assert_eq!(streams["clip"], SourceSpec::File(dir.join("clip.mp4")));
        assert_eq!(streams["test"], SourceSpec::Test);
    }

    #[test]
    fn unreadable_directory_is_named() {
        let err = catalogue(Some(Path::new("/nonexistent/media"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/media"), "{err}");
    }
}
