//! Staging on a backend with multipart uploads (S3, GCS, Azure, memory): each
//! chunk is one part (part index = chunk number); its part id is persisted as
//! an object under the session so any node can complete the upload.

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::PartId;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use super::ChunkCheck;
use super::manifest::session_prefix;
use crate::error::{Error, Result};
use crate::protocol::upload::ChunkLayout;
use crate::server::store::Store;

pub struct MultipartStaging<'a> {
    store: &'a Store,
    id: &'a str,
    key: Path,
    upload_id: &'a str,
}

impl<'a> MultipartStaging<'a> {
    pub fn new(store: &'a Store, id: &'a str, key: &str, upload_id: &'a str) -> Self {
        Self {
            store,
            id,
            key: Path::from(key),
            upload_id,
        }
    }

    fn parts_prefix(&self) -> Path {
        session_prefix(self.id).join("parts")
    }

    pub async fn received(&self) -> Result<Vec<u64>> {
        let listed: Vec<ObjectMeta> = self
            .store
            .objects
            .list(Some(&self.parts_prefix()))
            .try_collect()
            .await?;
        let mut indices: Vec<u64> = listed
            .iter()
            .filter_map(|m| m.location.filename()?.parse().ok())
            .collect();
        indices.sort_unstable();
        Ok(indices)
    }

    /// Buffers the chunk (parts go up whole), checks it, then sends the part.
    pub async fn write_chunk(
        &self,
        layout: ChunkLayout,
        index: u64,
        check: ChunkCheck,
        body: &mut BoxStream<'static, Result<Bytes>>,
    ) -> Result<()> {
        let expected = layout
            .chunk_len(index)
            .expect("index checked by the caller");
        let mut buffer = BytesMut::with_capacity(expected as usize);
        while let Some(piece) = body.next().await {
            let piece = piece?;
            if (buffer.len() + piece.len()) as u64 > expected {
                return Err(check.too_long());
            }
            buffer.extend_from_slice(&piece);
        }
        check.verify(buffer.len() as u64, crc32c::crc32c(&buffer))?;
        let multipart = self.store.multipart.as_ref().expect("a multipart backend");
        let part = multipart
            .put_part(
                &self.key,
                &self.upload_id.to_owned(),
                index as usize,
                PutPayload::from(buffer.freeze()),
            )
            .await?;
        self.store
            .objects
            .put(
                &self.parts_prefix().join(index.to_string()),
                PutPayload::from(part.content_id),
            )
            .await?;
        Ok(())
    }

    /// Completes the multipart upload at its key.
    pub async fn complete(&self, layout: ChunkLayout) -> Result<()> {
        let mut parts = Vec::with_capacity(layout.chunk_count() as usize);
        for index in 0..layout.chunk_count() {
            let record = self
                .store
                .objects
                .get(&self.parts_prefix().join(index.to_string()))
                .await?;
            let content_id = String::from_utf8(record.bytes().await?.to_vec())
                .map_err(|_| Error::Storage("corrupt part record".into()))?;
            parts.push(PartId { content_id });
        }
        let multipart = self.store.multipart.as_ref().expect("a multipart backend");
        multipart
            .complete_multipart(&self.key, &self.upload_id.to_owned(), parts)
            .await?;
        Ok(())
    }

    /// SHA-256 of the completed object at the staging key.
    pub async fn sha256(&self) -> Result<String> {
        let mut stream = self.store.objects.get(&self.key).await?.into_stream();
        let mut hasher = Sha256::new();
        while let Some(piece) = stream.next().await {
            hasher.update(piece?);
        }
        Ok(hex::encode(hasher.finalize()))
    }

    pub fn key(&self) -> &Path {
        &self.key
    }

    pub async fn abort(&self) -> Result<()> {
        let multipart = self.store.multipart.as_ref().expect("a multipart backend");
        match multipart
            .abort_multipart(&self.key, &self.upload_id.to_owned())
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
