//! The HTTP/1 relay's per-request work — parse the head, decide, write the
//! onward head and the event's fields — allocates nothing for a request
//! whose path is already in normal form, whose host is lower-case and
//! whose rules are plain text (or text then `.*`): counted by a global
//! allocator on this thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use meshward_l7_proxy::decide::{decide_request, Decision, RequestInfo};
use meshward_l7_proxy::h1::{header_slots, parse_request, split_target, write_request_head};
use meshward_l7_proxy::rules::Headers;
use meshward_l7_proxy::{HttpRuleSet, PortPolicy};
use meshward_policy::crd::{HeaderMatch, HttpRule};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

fn note() {
    // try_with: no panic while the thread's locals are torn down.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|on| on.set(true));
    f();
    COUNTING.with(|on| on.set(false));
    COUNT.with(|c| c.get())
}

fn rule(method: &str, path: &str) -> HttpRule {
    HttpRule {
        method: Some(method.into()),
        path: Some(path.into()),
        ..Default::default()
    }
}

/// One request as the relay handles it; the onward head in `out`.
fn handle(raw: &[u8], policy: &PortPolicy, out: &mut Vec<u8>) -> bool {
    let mut slots = header_slots();
    let head = parse_request(raw, &mut slots, 64 * 1024).unwrap().unwrap();
    let (path, query, authority) = split_target(head.target).unwrap();
    let info = RequestInfo {
        method: head.method,
        path,
        query,
        authority,
        headers: Headers::Raw(head.headers),
    };
    let (decision, summary) = decide_request(&info, policy, &PortPolicy::AllowAll);
    let forward = matches!(decision, Decision::Forward { .. });
    if forward {
        write_request_head(out, &head, &summary.path, query, authority);
    }
    // What the event would carry, borrowed.
    assert!(!summary.method.is_empty() && !summary.path.is_empty());
    forward
}

#[test]
fn allowed_request_allocates_nothing() {
    let mut orders = rule("POST", "/api/v1/orders");
    orders.header_matches = Some(vec![HeaderMatch {
        name: "content-type".into(),
        value: Some("application/json".into()),
    }]);
    let rules = [
        rule("GET", "/api/v1/products.*"),
        orders,
        rule("GET", "/healthz"),
    ];
    let policy = PortPolicy::Http(Arc::new(
        HttpRuleSet::new(rules.iter().map(|r| (r, "P"))).unwrap(),
    ));
    let mut out = Vec::with_capacity(1024);
    let get = b"GET /api/v1/products/1?x=1 HTTP/1.1\r\nHost: 198.18.1.1:8090\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n";
    let post = b"POST /api/v1/orders HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    // Warm-up outside the count (lazy statics of the regex crate, if any).
    assert!(handle(get, &policy, &mut out));
    for raw in [&get[..], &post[..]] {
        let mut allowed = false;
        let n = allocations(|| allowed = handle(raw, &policy, &mut out));
        assert!(allowed);
        assert_eq!(n, 0, "allocations for {:?}", String::from_utf8_lossy(raw));
    }
    assert!(String::from_utf8_lossy(&out).starts_with("POST /api/v1/orders HTTP/1.1\r\n"));

    // The counter counts: a path to normalise and an upper-case host do
    // allocate.
    let odd = b"GET /api/v1//products/./1 HTTP/1.1\r\nHost: Shop\r\n\r\n";
    assert!(allocations(|| assert!(handle(odd, &policy, &mut out))) > 0);
}
