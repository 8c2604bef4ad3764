//! Locations: local paths, `file://` URLs and `s3://bucket/key` URLs, opened as
//! object stores, with blocking helpers to read, write and list them.
//!
//! Owns the parsing of a location string ([`open`]), the crate's internal tokio runtime
//! (a small current-thread runtime shared by all callers; object_store is async, the
//! callers of this crate are plain threads), whole-object reads and writes
//! ([`read_all`], [`write_all`]), listing ([`list`]), removal ([`remove_all`]) and
//! [`OutputFile`], a streaming
//! writer that publishes its file atomically when finished.
//!
//! S3 settings come from the usual `AWS_*` environment variables (see [`open`]).

use std::fs::File;
use std::future::Future;
use std::io::{BufWriter, Write};
use std::path::{Component, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::ConnectorError;

/// A parsed location.
#[derive(Clone, Debug)]
enum Target {
    /// A local file or directory: an absolute, lexically normalised path, and whether the
    /// user wrote it as a `file://` URL (listings answer in the same style).
    Local { path: PathBuf, file_url: bool },
    /// An object in an S3 bucket (or an S3-compatible server).
    S3 { bucket: String, key: Path },
}

fn parse(location: &str) -> Result<Target, ConnectorError> {
    if location.trim().is_empty() {
        return Err(ConnectorError::input(location, "empty file path or URL"));
    }
    let Some((scheme, _)) = location.split_once("://") else {
        return Ok(Target::Local {
            path: absolute(location, std::path::Path::new(location))?,
            file_url: false,
        });
    };
    let url = url::Url::parse(location)
        .map_err(|e| ConnectorError::input(location, format!("not a valid URL: {e}")))?;
    match scheme.to_ascii_lowercase().as_str() {
        "file" => {
            let path = url.to_file_path().map_err(|()| {
                ConnectorError::input(location, "a file:// URL must hold an absolute local path")
            })?;
            Ok(Target::Local {
                path: absolute(location, &path)?,
                file_url: true,
            })
        }
        "s3" => {
            let bucket = url.host_str().unwrap_or("").to_string();
            if bucket.is_empty() {
                return Err(ConnectorError::input(
                    location,
                    "an s3:// URL needs a bucket: s3://bucket/key",
                ));
            }
            let key = Path::from_url_path(url.path().trim_start_matches('/'))
                .map_err(|e| ConnectorError::input(location, format!("invalid object key: {e}")))?;
            Ok(Target::S3 { bucket, key })
        }
        other => Err(ConnectorError::input(
            location,
            format!("unsupported URL scheme '{other}://'; use a local path, file:// or s3://"),
        )),
    }
}

/// Makes a path absolute (against the current directory) and removes `.` and `..`
/// lexically, as object_store paths may not contain them.
fn absolute(location: &str, p: &std::path::Path) -> Result<PathBuf, ConnectorError> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| ConnectorError::io(location, e))?
            .join(p)
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

fn local_object_path(location: &str, path: &std::path::Path) -> Result<Path, ConnectorError> {
    Path::from_absolute_path(path)
        .map_err(|e| ConnectorError::input(location, format!("invalid local path: {e}")))
}

#[cfg(feature = "s3")]
fn s3_store(location: &str, bucket: &str) -> Result<Arc<dyn ObjectStore>, ConnectorError> {
    use object_store::aws::AmazonS3Builder;
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()));
    if let Some(endpoint) = endpoint {
        // A custom endpoint is a local or self-hosted S3-compatible server: address the
        // bucket in the path (no DNS per bucket) and allow plain HTTP where it is given.
        let http = endpoint.to_ascii_lowercase().starts_with("http://");
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false);
        if http {
            builder = builder.with_allow_http(true);
        }
    }
    let store = builder
        .build()
        .map_err(|e| ConnectorError::input(location, format!("S3 configuration: {e}")))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "s3"))]
fn s3_store(location: &str, _bucket: &str) -> Result<Arc<dyn ObjectStore>, ConnectorError> {
    Err(ConnectorError::input(
        location,
        "this build of herald-connectors has no S3 support (feature `s3`)",
    ))
}

/// Opens a location as an object store and the object path inside it.
///
/// - A plain path (relative to the current directory or absolute) or a `file://` URL:
///   the local file system, rooted at `/`, and the absolute path.
/// - `s3://bucket/key`: Amazon S3 configured from the environment (`AWS_ACCESS_KEY_ID`,
///   `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, …). When `AWS_ENDPOINT_URL_S3`,
///   `AWS_ENDPOINT_URL` or `AWS_ENDPOINT` is set (an S3-compatible server such as MinIO),
///   requests go to that endpoint with path-style addressing, and plain HTTP is allowed
///   when the endpoint is an `http://` URL (or `AWS_ALLOW_HTTP=true`).
///
/// Errors: an unsupported scheme, a URL without bucket or an invalid path is
/// [`Fault::Input`](crate::Fault::Input).
pub fn open(url_or_path: &str) -> Result<(Arc<dyn ObjectStore>, Path), ConnectorError> {
    match parse(url_or_path)? {
        Target::Local { path, .. } => Ok((
            Arc::new(LocalFileSystem::new()),
            local_object_path(url_or_path, &path)?,
        )),
        Target::S3 { bucket, key } => Ok((s3_store(url_or_path, &bucket)?, key)),
    }
}

/// Runs a future to completion on the crate's runtime. Safe to call from any thread,
/// including from inside another tokio runtime (then the work runs on a helper thread).
pub(crate) fn block_on<F>(location: &str, fut: F) -> Result<F::Output, ConnectorError>
where
    F: Future + Send,
    F::Output: Send,
{
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    let rt = RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name("herald-connectors-io")
                .build()
                .map_err(|e| format!("cannot start the I/O runtime: {e}"))
        })
        .as_ref()
        .map_err(|message| ConnectorError::Runtime {
            location: location.to_string(),
            message: message.clone(),
        })?;
    if tokio::runtime::Handle::try_current().is_ok() {
        // Blocking inside a runtime's context panics in tokio; use a plain thread.
        std::thread::scope(|s| s.spawn(|| rt.block_on(fut)).join()).map_err(|_| {
            ConnectorError::Runtime {
                location: location.to_string(),
                message: "the I/O worker thread panicked".to_string(),
            }
        })
    } else {
        Ok(rt.block_on(fut))
    }
}

/// Reads a whole file or object into memory.
pub fn read_all(url_or_path: &str) -> Result<Bytes, ConnectorError> {
    let (store, path) = open(url_or_path)?;
    block_on(
        url_or_path,
        async move { store.get(&path).await?.bytes().await },
    )?
    .map_err(|e| ConnectorError::storage(url_or_path, e))
}

/// Writes a whole file or object, replacing any previous one. Atomic: readers see the
/// old content or the new, never a partial file (object_store's local file system writes
/// to a staging file `<path>#<n>` in the same directory and renames it into place; an S3
/// PUT is atomic by itself). Missing parent directories are created.
pub fn write_all(url_or_path: &str, bytes: impl Into<Bytes>) -> Result<(), ConnectorError> {
    let (store, path) = open(url_or_path)?;
    let payload = PutPayload::from_bytes(bytes.into());
    block_on(url_or_path, async move { store.put(&path, payload).await })?
        .map(|_| ())
        .map_err(|e| ConnectorError::storage(url_or_path, e))
}

/// Whether a file or object exists at the location (a directory or a bare prefix is not
/// an object).
pub fn exists(url_or_path: &str) -> Result<bool, ConnectorError> {
    let (store, path) = open(url_or_path)?;
    match block_on(url_or_path, async move { store.head(&path).await })? {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(ConnectorError::storage(url_or_path, e)),
    }
}

/// Deletes one file or object; one that is not there is not an error.
pub fn remove(url_or_path: &str) -> Result<(), ConnectorError> {
    let (store, path) = open(url_or_path)?;
    match block_on(url_or_path, async move { store.delete(&path).await })? {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(ConnectorError::storage(url_or_path, e)),
    }
}

/// Deletes every file or object under a directory or prefix (recursively); returns how
/// many. Nothing there is not an error.
pub fn remove_all(prefix_url: &str) -> Result<usize, ConnectorError> {
    let (store, prefix) = open(prefix_url)?;
    let prefix_opt = (!prefix.is_root()).then_some(prefix);
    block_on(prefix_url, async move {
        let metas: Vec<object_store::ObjectMeta> =
            store.list(prefix_opt.as_ref()).try_collect().await?;
        for m in &metas {
            match store.delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(metas.len())
    })?
    .map_err(|e| ConnectorError::storage(prefix_url, e))
}

/// Lists the files or objects under a directory or prefix, recursively, sorted. Each
/// entry is a location in the same style as the argument (plain path, `file://` URL or
/// `s3://` URL), ready to pass to [`read_all`]. A prefix with nothing under it gives an
/// empty list.
pub fn list(prefix_url: &str) -> Result<Vec<String>, ConnectorError> {
    Ok(list_with_times(prefix_url)?
        .into_iter()
        .map(|(entry, _)| entry)
        .collect())
}

/// The Parquet files a location names: the file itself, or every `*.parquet` under a
/// directory or prefix (sorted by name; names starting with `.` or `_`, such as staging
/// files and `_SUCCESS` markers, are skipped). A trailing slash always names a prefix: a
/// HEAD on it is not meaningful, and some S3-compatible servers answer it with an error.
/// No Parquet file there or under it is [`ConnectorError::NotFound`].
pub fn parquet_files(url: &str) -> Result<Vec<String>, ConnectorError> {
    if !url.ends_with('/') && exists(url)? {
        return Ok(vec![url.to_string()]);
    }
    let files: Vec<String> = list(url)?
        .into_iter()
        .filter(|f| {
            let name = f.rsplit('/').next().unwrap_or(f);
            !name.starts_with('.')
                && !name.starts_with('_')
                && name.to_ascii_lowercase().ends_with(".parquet")
        })
        .collect();
    if files.is_empty() {
        return Err(ConnectorError::NotFound {
            location: url.to_string(),
            detail: "no Parquet file there or under it".to_string(),
        });
    }
    Ok(files)
}

/// Like [`list`], with each entry's last-modified instant (ms since the epoch).
pub fn list_with_times(prefix_url: &str) -> Result<Vec<(String, i64)>, ConnectorError> {
    let target = parse(prefix_url)?;
    let (store, prefix) = open(prefix_url)?;
    let prefix_opt = (!prefix.is_root()).then_some(prefix);
    let metas: Vec<object_store::ObjectMeta> = block_on(prefix_url, async move {
        store.list(prefix_opt.as_ref()).try_collect().await
    })?
    .map_err(|e| ConnectorError::storage(prefix_url, e))?;
    let local = LocalFileSystem::new();
    let mut out = Vec::with_capacity(metas.len());
    for meta in metas {
        let entry = match &target {
            Target::Local { file_url, .. } => {
                let fs_path = local
                    .path_to_filesystem(&meta.location)
                    .map_err(|e| ConnectorError::storage(prefix_url, e))?;
                if *file_url {
                    url::Url::from_file_path(&fs_path)
                        .map(String::from)
                        .unwrap_or_else(|()| format!("file://{}", fs_path.display()))
                } else {
                    fs_path.to_string_lossy().into_owned()
                }
            }
            Target::S3 { bucket, .. } => format!("s3://{bucket}/{}", meta.location),
        };
        out.push((entry, meta.last_modified.timestamp_millis()));
    }
    out.sort();
    Ok(out)
}

/// A file or object being written as a stream. Local files are written through a
/// buffered writer to a temporary file in the destination directory and renamed into
/// place by [`OutputFile::finish`]; remote objects are buffered in memory and uploaded
/// with one PUT by `finish`. Dropping an unfinished `OutputFile` leaves the destination
/// untouched (and removes the temporary file).
pub struct OutputFile {
    location: String,
    inner: Inner,
}

enum Inner {
    Local {
        dest: PathBuf,
        tmp: PathBuf,
        writer: Option<BufWriter<File>>,
    },
    Remote {
        store: Arc<dyn ObjectStore>,
        path: Path,
        buf: Vec<u8>,
    },
}

impl OutputFile {
    /// Starts writing the file or object at a location. Creates missing parent
    /// directories of a local file.
    pub fn create(url_or_path: &str) -> Result<OutputFile, ConnectorError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let inner = match parse(url_or_path)? {
            Target::Local { path: dest, .. } => {
                let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
                    return Err(ConnectorError::input(url_or_path, "not a file path"));
                };
                std::fs::create_dir_all(dir).map_err(|e| ConnectorError::io(url_or_path, e))?;
                let n = COUNTER.fetch_add(1, Ordering::Relaxed);
                let mut tmp_name = std::ffi::OsString::from(".");
                tmp_name.push(name);
                tmp_name.push(format!(".herald-tmp-{}-{n}", std::process::id()));
                let tmp = dir.join(tmp_name);
                let file = File::create(&tmp).map_err(|e| ConnectorError::io(url_or_path, e))?;
                Inner::Local {
                    dest,
                    tmp,
                    writer: Some(BufWriter::with_capacity(1 << 20, file)),
                }
            }
            Target::S3 { .. } => {
                let (store, path) = open(url_or_path)?;
                Inner::Remote {
                    store,
                    path,
                    buf: Vec::new(),
                }
            }
        };
        Ok(OutputFile {
            location: url_or_path.to_string(),
            inner,
        })
    }

    /// The location being written, as given to [`OutputFile::create`].
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Flushes and publishes the file: renames the local temporary file into place (after
    /// syncing it to disk) or uploads the object.
    pub fn finish(mut self) -> Result<(), ConnectorError> {
        let location = self.location.clone();
        match &mut self.inner {
            Inner::Local { dest, tmp, writer } => {
                let Some(writer) = writer.take() else {
                    return Ok(());
                };
                let file = writer
                    .into_inner()
                    .map_err(|e| ConnectorError::io(&location, e.into_error()))?;
                file.sync_all()
                    .map_err(|e| ConnectorError::io(&location, e))?;
                drop(file);
                std::fs::rename(&*tmp, &*dest).map_err(|e| ConnectorError::io(&location, e))
            }
            Inner::Remote { store, path, buf } => {
                let payload = PutPayload::from(std::mem::take(buf));
                let (store, path) = (Arc::clone(store), path.clone());
                block_on(&location, async move { store.put(&path, payload).await })?
                    .map(|_| ())
                    .map_err(|e| ConnectorError::storage(&location, e))
            }
        }
    }
}

impl Write for OutputFile {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match &mut self.inner {
            Inner::Local { writer, .. } => match writer {
                Some(w) => w.write(data),
                None => Err(std::io::Error::other("output already finished")),
            },
            Inner::Remote { buf, .. } => {
                buf.extend_from_slice(data);
                Ok(data.len())
            }
        }
    }

    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match &mut self.inner {
            Inner::Local { writer, .. } => match writer {
                Some(w) => w.write_all(data),
                None => Err(std::io::Error::other("output already finished")),
            },
            Inner::Remote { buf, .. } => {
                buf.extend_from_slice(data);
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.inner {
            Inner::Local {
                writer: Some(w), ..
            } => w.flush(),
            _ => Ok(()),
        }
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if let Inner::Local { tmp, writer, .. } = &mut self.inner {
            if writer.take().is_some() {
                let _ = std::fs::remove_file(&*tmp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_and_file_urls_are_local() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/./x/../a.txt");
        let s = p.to_str().unwrap();
        write_all(s, &b"hello"[..]).unwrap();
        assert_eq!(&read_all(s).unwrap()[..], b"hello");
        let url = format!("file://{}", dir.path().join("sub/a.txt").display());
        assert_eq!(&read_all(&url).unwrap()[..], b"hello");
        assert!(exists(s).unwrap());
        assert!(!exists(dir.path().join("sub").to_str().unwrap()).unwrap());
        let listed = list(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(
            listed,
            vec![dir.path().join("sub/a.txt").display().to_string()]
        );
        let listed = list(&format!("file://{}", dir.path().display())).unwrap();
        assert!(listed[0].starts_with("file:///"), "{listed:?}");
        assert_eq!(&read_all(&listed[0]).unwrap()[..], b"hello");
    }

    #[test]
    fn missing_files_and_bad_urls_are_input_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jsonl");
        let err = read_all(missing.to_str().unwrap()).unwrap_err();
        assert_eq!(err.fault(), crate::Fault::Input);
        assert!(err.to_string().contains("nope.jsonl"), "{err}");
        let err = read_all("gs://bucket/x").unwrap_err();
        assert_eq!(err.fault(), crate::Fault::Input);
        assert!(err.to_string().contains("gs://bucket/x"), "{err}");
        assert!(open("s3:///key").is_err());
        assert!(open("").is_err());
    }

    #[cfg(feature = "s3")]
    #[test]
    fn s3_urls_open_without_network() {
        let (_store, path) = open("s3://bucket/lists/beta list.csv").unwrap();
        assert_eq!(path.as_ref(), "lists/beta list.csv");
    }

    #[test]
    fn output_file_publishes_on_finish_only() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out/changes.jsonl");
        let mut out = OutputFile::create(dest.to_str().unwrap()).unwrap();
        out.write_all(b"line\n").unwrap();
        assert!(!dest.exists());
        out.finish().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"line\n");
        let mut out = OutputFile::create(dest.to_str().unwrap()).unwrap();
        out.write_all(b"other\n").unwrap();
        drop(out);
        assert_eq!(std::fs::read(&dest).unwrap(), b"line\n");
        assert_eq!(
            std::fs::read_dir(dir.path().join("out")).unwrap().count(),
            1
        );
    }

    #[test]
    fn works_from_inside_a_tokio_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        let p = p.to_str().unwrap().to_string();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            write_all(&p, &b"x"[..]).unwrap();
            assert_eq!(&read_all(&p).unwrap()[..], b"x");
        });
    }
}
