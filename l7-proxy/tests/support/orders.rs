//! The gRPC services shared by tests/grpc.rs and the bench server
//! (examples/l7-bench-grpc-server.rs): `com.example.OrderService`
//! (`PlaceOrder` unary, `ListOrders` server-streaming) and
//! `com.example.AdminService/Reset`. Messages are prost-derived by hand and
//! the services go through tonic's generic `server::Grpc` with
//! `ProstCodec`, so no `protoc` is needed.
#![allow(dead_code)]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_stream::StreamExt;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

/// Largest message either side accepts (tonic's default is 4 MiB).
pub const MAX_MESSAGE: usize = 16 << 20;

pub const PLACE_ORDER: &str = "/com.example.OrderService/PlaceOrder";
pub const LIST_ORDERS: &str = "/com.example.OrderService/ListOrders";
pub const RESET: &str = "/com.example.AdminService/Reset";

#[derive(Clone, PartialEq, prost::Message)]
pub struct OrderRequest {
    #[prost(string, tag = "1")]
    pub item: String,
    #[prost(uint32, tag = "2")]
    pub quantity: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub note: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OrderReply {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub item: String,
    #[prost(uint32, tag = "3")]
    pub quantity: u32,
    /// Length and checksum of the request's note, as the server saw it.
    #[prost(uint64, tag = "4")]
    pub note_len: u64,
    #[prost(uint64, tag = "5")]
    pub note_sum: u64,
    /// Streamed replies carry a generated payload (see `pattern`).
    #[prost(bytes = "vec", tag = "6")]
    pub payload: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListRequest {
    #[prost(string, tag = "1")]
    pub item: String,
    #[prost(uint32, tag = "2")]
    pub count: u32,
    /// Payload bytes in each reply.
    #[prost(uint32, tag = "3")]
    pub payload_bytes: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResetRequest {
    #[prost(bool, tag = "1")]
    pub hard: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResetReply {
    #[prost(uint32, tag = "1")]
    pub cleared: u32,
}

/// A position-dependent byte pattern (seeded), so a dropped, duplicated or
/// reordered chunk shows.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let base = seed.wrapping_mul(0x9E37_79B9);
    (0..len)
        .map(|i| ((i as u32).wrapping_add(base).wrapping_mul(2_654_435_761) >> 16) as u8)
        .collect()
}

pub fn checksum(b: &[u8]) -> u64 {
    b.iter().enumerate().fold(0u64, |acc, (i, &x)| {
        acc.wrapping_mul(31)
            .wrapping_add(x as u64 ^ (i as u64 & 0xff))
    })
}

/// What the server handled, by method.
#[derive(Default)]
pub struct Calls {
    pub place: AtomicUsize,
    pub list: AtomicUsize,
    pub reset: AtomicUsize,
    /// TCP connections accepted from the proxy.
    pub accepted: AtomicUsize,
}

#[derive(Clone)]
pub struct PlaceOrder(pub Arc<Calls>);

impl Service<Request<OrderRequest>> for PlaceOrder {
    type Response = Response<OrderReply>;
    type Error = Status;
    type Future = std::future::Ready<Result<Response<OrderReply>, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<OrderRequest>) -> Self::Future {
        let n = self.0.place.fetch_add(1, Ordering::Relaxed);
        let r = req.into_inner();
        std::future::ready(Ok(Response::new(OrderReply {
            id: format!("order-{n}"),
            note_len: r.note.len() as u64,
            note_sum: checksum(&r.note),
            item: r.item,
            quantity: r.quantity,
            payload: Vec::new(),
        })))
    }
}

pub type ReplyStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<OrderReply, Status>> + Send>>;

#[derive(Clone)]
pub struct ListOrders(pub Arc<Calls>);

impl Service<Request<ListRequest>> for ListOrders {
    type Response = Response<ReplyStream>;
    type Error = Status;
    type Future = std::future::Ready<Result<Response<ReplyStream>, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<ListRequest>) -> Self::Future {
        self.0.list.fetch_add(1, Ordering::Relaxed);
        let r = req.into_inner();
        if r.count > 1000 || r.payload_bytes as usize > MAX_MESSAGE / 2 {
            return std::future::ready(Err(Status::invalid_argument("too much")));
        }
        let item = r.item;
        let size = r.payload_bytes as usize;
        // Generated lazily, one message at a time.
        let stream = tokio_stream::iter(0..r.count).map(move |i| {
            Ok(OrderReply {
                id: format!("{item}-{i}"),
                item: item.clone(),
                quantity: i,
                payload: pattern(i, size),
                ..Default::default()
            })
        });
        std::future::ready(Ok(Response::new(Box::pin(stream) as ReplyStream)))
    }
}

#[derive(Clone)]
pub struct Reset(pub Arc<Calls>);

impl Service<Request<ResetRequest>> for Reset {
    type Response = Response<ResetReply>;
    type Error = Status;
    type Future = std::future::Ready<Result<Response<ResetReply>, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<ResetRequest>) -> Self::Future {
        self.0.reset.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(Response::new(ResetReply { cleared: 1 })))
    }
}

/// `com.example.OrderService` and `com.example.AdminService` behind one
/// tower service, routed by path as tonic's generated servers do.
#[derive(Clone)]
pub struct Services(pub Arc<Calls>);

impl Service<http::Request<Body>> for Services {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let calls = self.0.clone();
        Box::pin(async move {
            let resp = match req.uri().path() {
                PLACE_ORDER => {
                    grpc_server::<OrderRequest, OrderReply>()
                        .unary(PlaceOrder(calls), req)
                        .await
                }
                LIST_ORDERS => {
                    grpc_server::<ListRequest, OrderReply>()
                        .server_streaming(ListOrders(calls), req)
                        .await
                }
                RESET => {
                    grpc_server::<ResetRequest, ResetReply>()
                        .unary(Reset(calls), req)
                        .await
                }
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(resp)
        })
    }
}

pub fn grpc_server<Req, Rep>() -> tonic::server::Grpc<ProstCodec<Rep, Req>>
where
    Req: prost::Message + Default + Send + 'static,
    Rep: prost::Message + Send + 'static,
{
    tonic::server::Grpc::new(ProstCodec::default())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}
