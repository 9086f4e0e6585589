//! A webhook subscription wired to a small receiver.
//!
//! This program starts a tiny HTTP receiver on 127.0.0.1:7080 that prints every CloudEvent POSTed
//! to it. In another terminal, run a node and point a webhook subscription at the receiver:
//!
//! ```text
//! cargo run --example webhook                                   # the receiver
//! cargo run -- node                                              # a plain herald node
//! cargo run -- subscribe orders.created billing --webhook http://127.0.0.1:7080/events
//! cargo run -- publish orders.created '{"order":1,"total":9.5}'
//! ```
//!
//! Answer non-2xx (run with `--fail-every 3`) to watch retries and dead letters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let fail_every: u64 = args
        .iter()
        .position(|a| a == "--fail-every")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let addr = std::env::var("RECEIVER_ADDR").unwrap_or_else(|_| "127.0.0.1:7080".to_string());
    let count = Arc::new(AtomicU64::new(0));
    println!(
        "webhook receiver on http://{addr}/events (fail every {fail_every}th request: {})",
        fail_every > 0
    );
    HttpServer::new(move || {
        let count = count.clone();
        App::new().route(
            "/events",
            web::post().to(move |req: HttpRequest, body: web::Bytes| {
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                async move {
                    let attempt = req
                        .headers()
                        .get("x-herald-attempt")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("?");
                    if fail_every > 0 && n % fail_every == 0 {
                        println!("#{n} (attempt {attempt}): answering 503 on purpose");
                        return HttpResponse::ServiceUnavailable().finish();
                    }
                    println!("#{n} (attempt {attempt}): {}", String::from_utf8_lossy(&body));
                    HttpResponse::Ok().finish()
                }
            }),
        )
    })
    .workers(1)
    .bind(addr)?
    .run()
    .await
}
