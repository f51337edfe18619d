//! Answer formats beyond OpenAI's chat completions, metered end to end: Anthropic's
//! Messages stream (cached prompt tokens included) and OpenAI's Responses stream (usage
//! inside `response`, beside the output), cut mid-event by a recording upstream, through
//! keygate into `api_key_usage`, priced by `[pricing]`.

mod common;

use std::time::Duration;

use common::net::*;
use common::recorder::Recorder;
use common::*;

/// endpoint, prompt, completion and total tokens, model, cost.
type Row = (
    String,
    Option<i32>,
    Option<i32>,
    Option<i32>,
    Option<String>,
    Option<String>,
);

#[tokio::test]
async fn anthropic_and_responses_streams_are_billed_whole() {
    let (db, key) = seeded_db().await;
    let rec = Recorder::start().await;
    let pricing = "[pricing.models.claude-x]\nprompt_per_1k = 3.0\ncompletion_per_1k = 15.0\n";
    let gw = Gateway::start(&db, rec.port, pricing).await;
    for path in ["/v1/messages", "/v1/responses"] {
        // Anthropic's SDK sends the key as `x-api-key`.
        let r = post(&gw.url(path), &[("x-api-key", &key)], r#"{"stream":true}"#).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            String::from_utf8_lossy(&r.body).contains("\"usage\""),
            "{path}: the stream was cut"
        );
    }

    let c = db.client().await;
    let written = eventually(Duration::from_secs(10), async || {
        c.query_one("SELECT count(*) FROM api_key_usage", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 2)
    })
    .await;
    assert!(written, "two rows were not written");
    let rows = c
        .query(
            "SELECT endpoint, prompt_tokens, completion_tokens, tokens_used, model, cost_usd::text
             FROM api_key_usage ORDER BY endpoint",
            &[],
        )
        .await
        .expect("rows");
    let got: Vec<Row> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let row = |e: &str, p, c, t, m: &str, cost: &str| {
        (
            e.to_string(),
            Some(p),
            Some(c),
            Some(t),
            Some(m.to_string()),
            Some(cost.to_string()),
        )
    };
    assert_eq!(
        got,
        [
            // 25 uncached + 100 written to the cache + 5,000 read from it, at $3 per 1k;
            // 15 completion tokens at $15 per 1k.
            row("/v1/messages", 5125, 15, 5140, "claude-x", "15.600000"),
            // `cached_tokens` is a part of `input_tokens` here, not added again.
            row("/v1/responses", 37, 11, 48, "gpt-r", "0.000000"),
        ]
    );
}
