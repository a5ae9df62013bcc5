//! The message handed to router plugins as a WIT resource.

use std::sync::Arc;

use holdfast_model::Message;

/// What the resource table holds for the duration of one `route` call: a
/// shared reference, so handing the message to the plugin copies nothing.
#[derive(Debug, Clone)]
pub struct MessageRep(pub Arc<Message>);
