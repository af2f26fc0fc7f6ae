//! What can go wrong in the media pipelines, named by the pipeline (a
//! stream or the player), the element and the file involved.

use std::path::PathBuf;

use thiserror::Error;

/// A media failure. `pipeline` is "stream NAME" for a server source or
/// "player" for the client side.
#[derive(Debug, Error)]
pub enum MediaError {
    #[error("initialising GStreamer: {0}")]
    Init(String),
    #[error("{pipeline}: cannot create element {element} (is its GStreamer plugin installed?)")]
    Element { pipeline: String, element: String },
    #[error("{pipeline}: building the pipeline: {reason}")]
    Build { pipeline: String, reason: String },
    #[error("{pipeline}: the pipeline did not start: {reason}")]
    Start { pipeline: String, reason: String },
    #[error("stream {stream}: file {} has no audio or video stream GStreamer can read", file.display())]
    NoMedia { stream: String, file: PathBuf },
    #[error("media directory {}: {source}", dir.display())]
    Directory {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
