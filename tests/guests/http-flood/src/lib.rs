//! `HTTP_FLOOD`: makes the host hold HTTP resources. `"fields"`: creates
//! header maps of 16 KiB each and keeps them all (a host without budgets
//! holds 100,000 maps); `"big"`: one header of 128 KiB; `{"requests":
//! AUTHORITY}`: starts 100 requests without reading any response.
use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};
use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};

cordon_sdk::single_stage!("HTTP_FLOOD", "holds HTTP resources until the host refuses", run);

fn run(request: StageRequest) -> StageResult {
    let options: serde_json::Value = serde_json::from_str(&request.stage.options).unwrap_or_default();
    if let Some(authority) = options["requests"].as_str() {
        return requests(authority);
    }
    if options == "big" {
        let refused = Fields::new().append("x-big", &vec![b'a'; 128 << 10]);
        return finish(StageStatus::Failure, format!("a 128 KiB header: {refused:?}"));
    }
    let mut kept = Vec::new();
    for i in 0..100_000 {
        let fields = Fields::new();
        if let Err(e) = fields.append("x-fill", &vec![b'f'; 16 << 10]) {
            return finish(StageStatus::Failure, format!("append failed after {i} maps: {e:?}"));
        }
        kept.push(fields);
    }
    finish(StageStatus::Success, format!("BREACH: held {} header maps", kept.len()))
}

/// Starts 100 GETs to `authority` at once, keeping every pending response.
fn requests(authority: &str) -> StageResult {
    let mut pending = Vec::new();
    for _ in 0..100 {
        let request = OutgoingRequest::new(Fields::new());
        let _ = request.set_method(&Method::Get);
        let _ = request.set_scheme(Some(&Scheme::Http));
        let _ = request.set_authority(Some(authority));
        let _ = request.set_path_with_query(Some("/"));
        let Ok(body) = request.body() else { return finish(StageStatus::Failure, "no request body".to_string()) };
        let _ = OutgoingBody::finish(body, None);
        match outgoing_handler::handle(request, None) {
            Ok(future) => pending.push(future),
            Err(e) => return finish(StageStatus::Failure, format!("request {} refused: {e:?}", pending.len())),
        }
    }
    let mut answered = 0;
    for future in &pending {
        future.subscribe().block();
        match future.get() {
            Some(Ok(Ok(_response))) => answered += 1,
            Some(Ok(Err(e))) => return finish(StageStatus::Failure, format!("request refused after {answered} answered: {e:?}")),
            _ => return finish(StageStatus::Failure, "response unavailable".to_string()),
        }
    }
    finish(StageStatus::Success, format!("BREACH: {answered} requests in flight"))
}
