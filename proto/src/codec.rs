//! The protobuf codec of every Procurator service: prost's, with smaller
//! buffers. tonic gives each stream an 8 KiB encode and an 8 KiB decode
//! buffer up front; a control plane holding 10,000 idle agent streams paid
//! 160 MiB for buffers that carry a few hundred bytes at a time. They grow
//! on demand for larger messages (a submitted deployment.json).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The initial size of each stream's encode and decode buffers.
const BUFFER_SIZE: usize = 1024;
/// tonic's default: encode this much before yielding to other tasks.
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
