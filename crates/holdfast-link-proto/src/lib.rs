//! # holdfast-link-proto
//!
//! The Holdfast link protocol (`holdfast-link/1` to `/4`) without I/O, the
//! way `quinn-proto` is QUIC without sockets: state machines that take
//! bytes and frames and return frames, acks and events. The driver, crate
//! `holdfast-link`, owns the QUIC connection, the tasks, the outbox and the
//! clock, and feeds this crate what arrives.
//!
//! - [`wire`]: the frames and their encoding.
//! - [`compress`]: the lane streams' zstd contexts (bounded windows on
//!   both sides).
//! - [`decode`]: bytes in, whole frames out, cancel-safe by construction.
//! - [`window`]: a lane's send window and cumulative acks.
//! - [`lane`]: one outbox lane, the child's end and the parent's.
//! - [`handshake`]: the hello on the control stream, and the parent's answer.
//! - [`ids`]: the hop ids of a batch (link/4), for idempotent lanes.
//!
//! It does not touch the network, a clock, the disk or an async runtime:
//! the deterministic simulation in `tests/simulation.rs` runs it over a
//! seeded, lossy, partitioning network.
//!
//! ```
//! use bytes::Bytes;
//! use holdfast_link_proto::lane::{Acker, ChildLane, ParentLane};
//! use holdfast_link_proto::{decode::FrameDecoder, wire::Frame};
//! use holdfast_model::MessageId;
//!
//! let mut child = ChildLane::new(0, 100, None).unwrap();
//! let (mut parent, mut acker) = (ParentLane::new(0, 1 << 20, false), Acker::default());
//! let id = MessageId { instance: 1, lane: 0, seq: 1 };
//! let out = child.send(vec![(id, b"head".to_vec(), Bytes::from_static(b"body"))], None).unwrap();
//! let mut at_parent = FrameDecoder::new(1 << 20);
//! for f in &out.frames {
//!     at_parent.push(f);
//! }
//! assert_eq!(at_parent.next_frame().unwrap(), Some(Frame::Lane(0)));
//! let batch = at_parent.next_frame().unwrap().unwrap();
//! let records = parent.receive(batch).unwrap().unwrap().records;
//! assert_eq!(&records[0][..], b"headbody");
//! // Stored: the ack frees the child's window and names what to delete.
//! assert_eq!(child.receive(acker.stored(1)).unwrap(), vec![id]);
//! ```

pub mod compress;
pub mod decode;
pub mod handshake;
pub mod ids;
pub mod lane;
pub mod window;
pub mod wire;
