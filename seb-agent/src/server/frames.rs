//! Reading a connection's request frames with as few system calls as the bytes allow.
//!
//! A request (length prefix and body) usually arrives whole, so one read takes the prefix
//! and as much of the body as arrived, up to [`FIRST_READ`] bytes; only a larger body is
//! read on, as [`read_body_from`] reads any. The buffer is taken once bytes are ready:
//! an idle connection holds none. Bytes past the frame (a client that sends its next
//! request before the answer) wait for the next request, at most `FIRST_READ`.

use tokio::net::UnixStream;

use crate::protocol::{FrameError, frame_len, read_body_from};

/// The first read of a request, at most: a usual proposal fits whole.
const FIRST_READ: usize = 8 * 1024;

/// What a connection has read but not yet handed out.
#[derive(Debug, Default)]
pub struct FrameReader {
    read: Vec<u8>,
}

impl FrameReader {
    /// The next frame's length prefix, checked; waits for the peer to send one.
    pub async fn read_len(&mut self, stream: &UnixStream) -> Result<usize, FrameError> {
        while self.read.len() < 4 {
            match self.read_some(stream).await {
                Ok(0) if self.read.is_empty() => return Err(FrameError::Closed),
                Ok(0) => return Err(FrameError::Truncated(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) => return Err(FrameError::Truncated(e)),
            }
        }
        let prefix = self.read[..4].try_into().expect("4 bytes");
        self.read.drain(..4);
        frame_len(prefix)
    }

    /// The body of `len` bytes (its prefix read by [`Self::read_len`]): what the first
    /// read brought, then the rest from the socket.
    pub async fn read_body(&mut self, stream: &mut UnixStream, len: usize) -> Result<Vec<u8>, FrameError> {
        let here = self.read.len().min(len);
        // What follows the body (usually nothing: no allocation) stays for the next request.
        let after = self.read[here..].to_vec();
        self.read.truncate(here);
        let body = std::mem::replace(&mut self.read, after);
        read_body_from(stream, len, body).await
    }

    /// One read of what the peer sent, into room for [`FIRST_READ`] bytes.
    async fn read_some(&mut self, stream: &UnixStream) -> std::io::Result<usize> {
        loop {
            stream.readable().await?;
            self.read.reserve_exact(FIRST_READ.saturating_sub(self.read.len()));
            match stream.try_read_buf(&mut self.read) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                read => return read,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        [&(body.len() as u32).to_be_bytes()[..], body].concat()
    }

    /// The next frame's body; a frame lost in the reader fails the test, not hangs it.
    async fn next(frames: &mut FrameReader, stream: &mut UnixStream) -> Vec<u8> {
        let read = async {
            let len = frames.read_len(stream).await.unwrap();
            frames.read_body(stream, len).await.unwrap()
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), read).await.expect("a frame sent is read")
    }

    #[tokio::test]
    async fn frames_arriving_together_in_pieces_or_larger_than_a_read_come_out_whole() {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let mut frames = FrameReader::default();
        let large = vec![7; 3 * FIRST_READ];
        // Two frames in one write, then one in pieces split inside the prefix, then one
        // larger than the first read.
        theirs.write_all(&[frame(b"first"), frame(b"second")].concat()).await.unwrap();
        assert_eq!(next(&mut frames, &mut ours).await, b"first");
        assert_eq!(next(&mut frames, &mut ours).await, b"second");
        let split = frame(b"third");
        let writer = tokio::spawn(async move {
            for piece in [&split[..2], &split[2..6], &split[6..]] {
                theirs.write_all(piece).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            theirs.write_all(&frame(&large)).await.unwrap();
            theirs
        });
        assert_eq!(next(&mut frames, &mut ours).await, b"third");
        assert_eq!(next(&mut frames, &mut ours).await, vec![7; 3 * FIRST_READ]);
        assert!(frames.read.capacity() == 0, "nothing is held between requests");

        // A close between frames is a close; inside a prefix, a truncation.
        let mut theirs = writer.await.unwrap();
        theirs.write_all(&[0, 0]).await.unwrap();
        drop(theirs);
        assert!(matches!(frames.read_len(&ours).await, Err(FrameError::Truncated(_))));
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(matches!(FrameReader::default().read_len(&ours).await, Err(FrameError::Closed)));
    }
}
