//! Opening a backend from the `--store` argument.

use std::path::Path as FsPath;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;

use super::Store;
use crate::error::{Error, Result};

pub fn open(spec: &str) -> Result<Store> {
    if let Some(rest) = spec.strip_prefix("memory://") {
        if !rest.is_empty() {
            return Err(Error::BadRequest(format!(
                "memory:// takes no path: {spec}"
            )));
        }
        return Ok(remote(InMemory::new(), "memory://".into()));
    }
    if spec.starts_with("file://") {
        let url = url::Url::parse(spec).map_err(|e| Error::BadRequest(format!("{spec}: {e}")))?;
        let path = url
            .to_file_path()
            .map_err(|_| Error::BadRequest(format!("not a local path: {spec}")))?;
        return local(&path);
    }
    if let Some((scheme, _)) = spec.split_once("://") {
        return cloud(scheme, spec);
    }
    local(FsPath::new(spec))
}

/// A backend with multipart uploads, used both as the object store and as the
/// staging area of upload sessions.
fn remote<T: ObjectStore + MultipartStore>(store: T, description: String) -> Store {
    let store = Arc::new(store);
    Store {
        objects: store.clone(),
        multipart: Some(store),
        local_root: None,
        description,
        feed: Default::default(),
    }
}

fn local(dir: &FsPath) -> Result<Store> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Storage(format!("cannot create {}: {e}", dir.display())))?;
    let root = std::fs::canonicalize(dir)
        .map_err(|e| Error::Storage(format!("cannot open {}: {e}", dir.display())))?;
    // fsync: an acknowledged write survives power loss, as on a cloud store.
    let fs = LocalFileSystem::new_with_prefix(&root)?
        .with_automatic_cleanup(true)
        .with_fsync(true);
    Ok(Store {
        objects: Arc::new(fs),
        multipart: None,
        feed: Default::default(),
        description: root.display().to_string(),
        local_root: Some(root),
    })
}

#[cfg(feature = "cloud")]
fn cloud(scheme: &str, spec: &str) -> Result<Store> {
    use object_store::aws::AmazonS3Builder;
    use object_store::azure::MicrosoftAzureBuilder;
    use object_store::gcp::GoogleCloudStorageBuilder;
    use object_store::prefix::PrefixStore;

    let url = url::Url::parse(spec).map_err(|e| Error::BadRequest(format!("{spec}: {e}")))?;
    // The URL's path, if any, is a prefix inside the bucket or container.
    let prefix = url.path().trim_matches('/').to_owned();
    let description = spec.to_owned();
    match scheme {
        "s3" | "s3a" => {
            let s3 = AmazonS3Builder::from_env().with_url(spec).build()?;
            Ok(remote(PrefixStore::new(s3, prefix), description))
        }
        "gs" => {
            let gcs = GoogleCloudStorageBuilder::from_env()
                .with_url(spec)
                .build()?;
            Ok(remote(PrefixStore::new(gcs, prefix), description))
        }
        "az" | "azure" | "abfs" | "abfss" => {
            let azure = MicrosoftAzureBuilder::from_env().with_url(spec).build()?;
            Ok(remote(PrefixStore::new(azure, prefix), description))
        }
        other => Err(Error::BadRequest(format!(
            "unsupported store scheme {other}://"
        ))),
    }
}

#[cfg(not(feature = "cloud"))]
fn cloud(scheme: &str, spec: &str) -> Result<Store> {
    match scheme {
        "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" => Err(Error::BadRequest(format!(
            "{spec}: this build has no cloud backends; rebuild with `--features cloud`"
        ))),
        other => Err(Error::BadRequest(format!(
            "unsupported store scheme {other}://"
        ))),
    }
}
