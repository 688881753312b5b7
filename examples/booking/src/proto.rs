//! Generated gRPC code for the booking API and the mock upstream services.
#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

/// The public booking API (`package pb`).
pub mod pb {
    tonic::include_proto!("pb");
}

/// The mock upstream Order and Payment services (`package upstream`).
pub mod upstream {
    tonic::include_proto!("upstream");
}

/// Protobuf over gRPC with small codec buffers: the messages here are tens of bytes, and
/// tonic's default codec reserves 8 KiB for each call's encoder and decoder, so every booking
/// in flight held some 50 KiB of buffers across its own call and its two upstream calls. A
/// larger message grows its buffer as needed.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T, U> SmallBufferCodec<T, U> {
    /// Bytes reserved for a call's message before it is encoded or decoded.
    pub const BUFFER_SIZE: usize = 256;

    fn settings() -> tonic::codec::BufferSettings {
        tonic::codec::BufferSettings::new(Self::BUFFER_SIZE, 32 * 1024)
    }
}

impl<T, U> tonic::codec::Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
    type Decoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::raw_encoder(Self::settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(Self::settings())
    }
}

/// Encoded file descriptors of both protos, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
