//! One connection: read a request within the time and memory limits, answer it, repeat.
//! A bad message gets an error reply and closes this connection only.

use std::sync::{Arc, LazyLock};

use tokio::{io::AsyncWriteExt, net::UnixStream, time::timeout};
use tracing::debug;

use super::{
    Broker, error,
    frames::FrameReader,
    handlers,
    limits::{self, ConnectionSlot, FrameShare},
};
use crate::{
    admission::Peer,
    metrics::Limit,
    protocol::{Envelope, ErrorCode, FrameError, Response, VERSION, encode_frame, parse_request},
};

/// What a waiting connection is told when it is closed to make room or on shutdown;
/// encoded once, as floods displace connections by the thousand.
static DISPLACED: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let message = "the broker closed this waiting connection: it needed the room (broker.max_connections, \
                   broker.max_connections_per_uid) or is shutting down";
    frame(error(ErrorCode::Busy, message)).unwrap_or_default()
});

/// Serve `stream` until the peer closes it, a limit cuts it, it is displaced, or the
/// broker drains (a request under way is still answered).
pub async fn serve(mut stream: UnixStream, peer: Peer, broker: Arc<Broker>, slot: ConnectionSlot) {
    let mut frames = FrameReader::default();
    loop {
        slot.waiting();
        let read = tokio::select! {
            biased;
            _ = slot.cancelled() => {
                // Best effort, never waiting: say why before closing.
                let _ = stream.try_write(&DISPLACED);
                return;
            }
            read = read_request(&mut frames, &mut stream, &broker, peer.uid) => read,
        };
        let (frame, frame_share) = match read {
            Ok(frame) => frame,
            Err(Some(response)) => {
                let _ = reply(&mut stream, &broker, response).await;
                return;
            }
            Err(None) => return,
        };
        // From here on the request is being served: no longer displaced by new
        // connections (nor left running after being displaced while it waits below).
        slot.busy();
        // Parsed, the request may take far more than its bytes: that is metered too.
        let cost = limits::parsed_cost(&frame);
        let parsed_share = match broker.frame_memory.take(cost, peer.uid, false).await {
            Some(share) => share,
            None if !broker.frame_memory.could_take(cost) => {
                drop(frame_share);
                broker.metrics.count_limit(Limit::FrameMemory);
                let message = format!(
                    "the request would take {cost} bytes once parsed, more than the broker's request memory \
                     (broker.frame_memory_mib) holds"
                );
                let _ = reply(&mut stream, &broker, error(ErrorCode::TooLarge, message)).await;
                return;
            }
            None => {
                drop(frame_share);
                broker.metrics.count_limit(Limit::FrameMemory);
                let message = format!(
                    "the broker is parsing too many large requests (broker.frame_memory_mib); a request of {} \
                     JSON values does not fit now",
                    cost / limits::PARSED_VALUE_BYTES
                );
                let _ = reply(&mut stream, &broker, error(ErrorCode::Busy, message)).await;
                return;
            }
        };
        // A request that does not parse is answered, then its connection closed.
        let (response, close) = match parse_request(&frame) {
            Ok(request) => (handlers::handle(request, &peer, &broker).await, false),
            Err(refused) => (error(refused.code, refused.message), true),
        };
        // The request's memory goes back before the reply is written: a caller that
        // reads no reply holds nothing of it while the write waits.
        drop((frame, frame_share, parsed_share));
        if reply(&mut stream, &broker, response).await.is_err() || close {
            return;
        }
    }
}

/// The next request's bytes (from a caller of `uid`), with its share of the frame memory.
/// `Err(Some(_))` is the error to answer before closing; `Err(None)` closes without one.
async fn read_request(
    frames: &mut FrameReader,
    stream: &mut UnixStream,
    broker: &Broker,
    uid: u32,
) -> Result<(Vec<u8>, FrameShare), Option<Response>> {
    let limits = &broker.limits;
    let len = match timeout(limits.idle_timeout, frames.read_len(stream)).await {
        Err(_) => {
            broker.metrics.count_limit(Limit::IdleTimeout);
            return Err(None);
        }
        Ok(Ok(len)) => len,
        Ok(Err(FrameError::Closed)) => return Err(None),
        Ok(Err(e @ FrameError::TooLarge(_))) => return Err(Some(error(ErrorCode::TooLarge, e.to_string()))),
        Ok(Err(e)) => {
            debug!(error = %e, "dropping a connection with a truncated message");
            return Err(None);
        }
    };
    let Some(mut share) = broker.frame_memory.take(len, uid, true).await else {
        broker.metrics.count_limit(Limit::FrameMemory);
        let message = format!(
            "the broker is receiving too many large requests (broker.frame_memory_mib); a {len}-byte request does not fit now"
        );
        return Err(Some(error(ErrorCode::Busy, message)));
    };
    let body = tokio::select! {
        body = timeout(limits.frame_timeout, frames.read_body(stream, len)) => body,
        () = share.displaced() => {
            broker.metrics.count_limit(Limit::FrameMemory);
            let message = format!(
                "the {len}-byte request was still arriving when another needed the broker's request memory \
                 (broker.frame_memory_mib): it arrived too slowly"
            );
            return Err(Some(error(ErrorCode::Busy, message)));
        }
    };
    match body {
        Err(_) => {
            broker.metrics.count_limit(Limit::FrameTimeout);
            let message = format!("the {len}-byte request did not arrive within {} s", limits.frame_timeout.as_secs());
            Err(Some(error(ErrorCode::Timeout, message)))
        }
        // Displaced in the moment it arrived: its memory is promised to another.
        Ok(Ok(_)) if !share.arrived() => {
            broker.metrics.count_limit(Limit::FrameMemory);
            let message = format!(
                "the {len}-byte request was displaced as it arrived: another needed the broker's request memory \
                 (broker.frame_memory_mib)"
            );
            Err(Some(error(ErrorCode::Busy, message)))
        }
        Ok(Ok(body)) => Ok((body, share)),
        Ok(Err(e)) => {
            debug!(error = %e, "dropping a connection with a truncated message");
            Err(None)
        }
    }
}

/// A response as one frame: length prefix and body.
fn frame(response: Response) -> std::io::Result<Vec<u8>> {
    encode_frame(&Envelope { v: VERSION, body: response })
}

/// Write a reply now if the socket has room for it, else not at all.
pub fn try_reply(stream: &UnixStream, response: Response) -> std::io::Result<()> {
    stream.try_write(&frame(response)?).map(drop)
}

/// Write a reply; a peer that does not take it within the frame timeout is cut.
async fn reply(stream: &mut UnixStream, broker: &Broker, response: Response) -> std::io::Result<()> {
    let mut frame = frame(response)?;
    if frame.len() - 4 > crate::protocol::MAX_MESSAGE {
        // Clients refuse a larger message; every field is bounded, so this is a bug, and
        // the caller is told so rather than given what it cannot read.
        let message = format!("the broker's answer would be {} bytes, more than one message holds", frame.len() - 4);
        tracing::error!(bytes = frame.len() - 4, "an answer larger than one message was not sent");
        frame = self::frame(error(ErrorCode::Internal, message))?;
    }
    match timeout(broker.limits.frame_timeout, stream.write_all(&frame)).await {
        Ok(written) => written,
        Err(_) => {
            broker.metrics.count_limit(Limit::FrameTimeout);
            Err(std::io::ErrorKind::TimedOut.into())
        }
    }
}
