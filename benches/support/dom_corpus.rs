//! The `dom` workload's corpus: JSON documents shaped like real API payloads, generated
//! from a fixed seed (part of `alloc_workloads.rs`).
//!
//! Five kinds, mixed: paginated lists of resources (20–100 items), orders (one deeply
//! nested resource), time series (arrays of 10–200 ints and floats), event batches (log
//! records with trace ids), and articles with comment threads (long text fields). What
//! they share with real payloads, and what the allocator sees in the parsed trees: objects
//! nested 3–6 levels, every key an owned string, many short strings (ids, names, urls,
//! ISO timestamps, enum-like values), numbers in arrays, fields absent or `null` at
//! random, and a few long texts.

use serde_json::{json, Map, Value};

use super::Rng;

/// Documents are generated until their serialized text reaches this many bytes.
pub const CORPUS_BYTES: usize = 3 << 20;

const STATUSES: &[&str] = &["active", "pending", "suspended", "archived", "deleted"];
const TYPES: &[&str] = &["projects", "users", "repositories", "issues", "deployments", "invoices"];
const CURRENCIES: &[&str] = &["USD", "EUR", "GBP", "JPY", "CHF", "SEK"];
const COUNTRIES: &[&str] = &["US", "DE", "FR", "GB", "JP", "BR", "IN", "SE", "NL", "CA"];
const ORDER_EVENTS: &[&str] = &["created", "paid", "packed", "shipped", "delivered", "refunded"];
const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error"];
const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];
const SERVICES: &[&str] = &["api-gateway", "billing", "search", "auth", "checkout", "inventory"];
const REGIONS: &[&str] = &["us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-south-1"];
const METRICS: &[&str] = &[
    "http_request_duration_seconds",
    "http_requests_total",
    "process_resident_memory_bytes",
    "db_query_duration_seconds",
    "queue_depth",
];

/// A generator of API-like values over one PRNG.
struct Gen(Rng);

impl Gen {
    fn chance(&mut self, percent: u64) -> bool {
        self.0.below(100) < percent
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.0.below(high - low + 1)
    }

    fn pick(&mut self, of: &'static [&'static str]) -> &'static str {
        of[self.0.below(of.len() as u64) as usize]
    }

    fn hex(&mut self, digits: usize) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        (0..digits).map(|_| HEX[self.0.below(16) as usize] as char).collect()
    }

    fn uuid(&mut self) -> String {
        format!(
            "{}-{}-4{}-a{}-{}",
            self.hex(8),
            self.hex(4),
            self.hex(3),
            self.hex(3),
            self.hex(12)
        )
    }

    fn name(&mut self) -> String {
        format!("{} {}", capitalized(self.0.word()), capitalized(self.0.word()))
    }

    fn login(&mut self) -> String {
        format!("{}{}", self.0.word(), self.0.below(10_000))
    }

    /// An ISO 8601 UTC timestamp with milliseconds, in 2023–2024.
    fn timestamp(&mut self) -> String {
        let secs = 1_672_531_200 + self.0.below(2 * 365 * 86_400);
        let (y, m, d) = civil_from_days((secs / 86_400) as i64);
        let s = secs % 86_400;
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            s / 3600,
            s / 60 % 60,
            s % 60,
            self.0.below(1000)
        )
    }

    /// `words` words in sentences of 4–16 words.
    fn text(&mut self, words: u64) -> String {
        let mut text = String::new();
        let mut left_in_sentence = 0;
        for i in 0..words {
            if left_in_sentence == 0 {
                if i > 0 {
                    text.push_str(". ");
                }
                text.push_str(&capitalized(self.0.word()));
                left_in_sentence = self.between(4, 16);
            } else {
                text.push(' ');
                text.push_str(self.0.word());
            }
            left_in_sentence -= 1;
        }
        text.push('.');
        text
    }

    fn float(&mut self, max: u64, decimals: u32) -> f64 {
        let scale = 10u64.pow(decimals);
        self.0.below(max * scale) as f64 / scale as f64
    }

    fn floats(&mut self, n: u64, max: u64, decimals: u32) -> Value {
        (0..n).map(|_| json!(self.float(max, decimals))).collect()
    }

    fn ints(&mut self, n: u64, max: u64) -> Value {
        (0..n).map(|_| json!(self.0.below(max))).collect()
    }

    fn words(&mut self, n: u64) -> Value {
        (0..n).map(|_| Value::from(self.0.word())).collect()
    }

    /// Inserts `value()` under `key`, or `null` (`null_percent`), or nothing (`absent_percent`).
    fn optional(
        &mut self,
        object: &mut Map<String, Value>,
        key: &str,
        null_percent: u64,
        absent_percent: u64,
        value: impl FnOnce(&mut Self) -> Value,
    ) {
        let roll = self.0.below(100);
        if roll < absent_percent {
            return;
        }
        let v = if roll < absent_percent + null_percent {
            Value::Null
        } else {
            value(self)
        };
        object.insert(key.to_owned(), v);
    }

    fn user(&mut self) -> Value {
        let id = self.hex(24);
        let login = self.login();
        let mut user = Map::new();
        user.insert(
            "avatar_url".into(),
            json!(format!("https://avatars.example.com/u/{id}?v=4")),
        );
        user.insert("url".into(), json!(url("users", &login)));
        user.insert("id".into(), json!(id));
        user.insert("login".into(), json!(login));
        user.insert("site_admin".into(), json!(self.chance(5)));
        self.optional(&mut user, "name", 20, 10, |g| json!(g.name()));
        Value::Object(user)
    }

    /// One resource of a list: depth 4 below the item (relationships → project → data).
    fn resource(&mut self) -> Value {
        let kind = self.pick(TYPES);
        let id = self.uuid();
        let link = url(kind, &id);
        let mut attributes = Map::new();
        attributes.insert("name".into(), json!(self.name()));
        attributes.insert("slug".into(), json!(format!("{}-{}", self.0.word(), self.0.word())));
        attributes.insert("status".into(), json!(self.pick(STATUSES)));
        attributes.insert("created_at".into(), json!(self.timestamp()));
        attributes.insert("updated_at".into(), json!(self.timestamp()));
        attributes.insert("score".into(), json!(self.float(100, 4)));
        let tags = self.between(0, 6);
        attributes.insert("tags".into(), self.words(tags));
        attributes.insert("owner".into(), self.user());
        self.optional(&mut attributes, "description", 30, 20, |g| {
            let words = g.between(8, 40);
            json!(g.text(words))
        });
        self.optional(&mut attributes, "history", 0, 60, |g| {
            let n = g.between(10, 30);
            g.ints(n, 5000)
        });
        json!({
            "id": id,
            "type": kind,
            "links": { "self": link },
            "attributes": attributes,
            "relationships": {
                "project": { "data": { "type": "projects", "id": self.hex(12) } },
                "labels": { "meta": { "count": self.0.below(20) } },
            },
        })
    }

    fn page(&mut self) -> Value {
        let per_page = self.between(20, 100);
        let page = self.between(1, 40);
        let total = page * per_page + self.0.below(5000);
        let data: Value = (0..per_page).map(|_| self.resource()).collect();
        let base = format!("https://api.example.com/v2/{}?per_page={per_page}", self.pick(TYPES));
        let prev = if page > 1 {
            json!(format!("{base}&page={}", page - 1))
        } else {
            Value::Null
        };
        json!({
            "data": data,
            "meta": { "page": page, "per_page": per_page, "total": total, "has_more": self.chance(80),
                      "request_id": self.uuid(), "generated_at": self.timestamp() },
            "links": { "self": format!("{base}&page={page}"), "next": format!("{base}&page={}", page + 1),
                       "prev": prev },
        })
    }

    /// One order: customer → address → geo is depth 5.
    fn order(&mut self) -> Value {
        let lines: Value = (0..self.between(1, 20))
            .map(|_| {
                let mut line = Map::new();
                line.insert("sku".into(), json!(format!("SKU-{}", self.hex(8).to_uppercase())));
                line.insert("name".into(), json!(self.name()));
                line.insert("quantity".into(), json!(self.between(1, 12)));
                line.insert("unit_price".into(), json!(self.float(500, 2)));
                self.optional(
                    &mut line,
                    "discount",
                    40,
                    40,
                    |g| json!({ "code": g.hex(6).to_uppercase(), "percent": g.between(5, 50) }),
                );
                Value::Object(line)
            })
            .collect();
        let events: Value = (0..self.between(1, 6))
            .map(|_| json!({ "at": self.timestamp(), "kind": self.pick(ORDER_EVENTS), "actor": self.user() }))
            .collect();
        let mut customer = Map::new();
        customer.insert("id".into(), json!(self.uuid()));
        customer.insert("name".into(), json!(self.name()));
        customer.insert("email".into(), json!(format!("{}@example.com", self.login())));
        self.optional(&mut customer, "phone", 50, 10, |g| {
            json!(format!("+1-555-{:03}-{:04}", g.0.below(1000), g.0.below(10_000)))
        });
        customer.insert(
            "address".into(),
            json!({
                "line1": format!("{} {} Street", self.between(1, 9999), capitalized(self.0.word())),
                "city": capitalized(self.0.word()),
                "postal_code": format!("{:05}", self.0.below(100_000)),
                "country": self.pick(COUNTRIES),
                "geo": { "lat": self.float(90, 6), "lng": self.float(180, 6) },
            }),
        );
        let mut order = Map::new();
        order.insert("id".into(), json!(self.uuid()));
        order.insert("number".into(), json!(self.between(100_000, 999_999)));
        order.insert("status".into(), json!(self.pick(ORDER_EVENTS)));
        order.insert("placed_at".into(), json!(self.timestamp()));
        order.insert("currency".into(), json!(self.pick(CURRENCIES)));
        order.insert("customer".into(), Value::Object(customer));
        order.insert("lines".into(), lines);
        order.insert(
            "totals".into(),
            json!({ "subtotal": self.float(5000, 2), "tax": self.float(500, 2), "shipping": self.float(50, 2) }),
        );
        order.insert("events".into(), events);
        self.optional(&mut order, "notes", 60, 10, |g| {
            let words = g.between(40, 200);
            json!(g.text(words))
        });
        json!({ "order": order, "request_id": self.uuid() })
    }

    /// Query results: a few series, each with 10–200 timestamps and values.
    fn timeseries(&mut self) -> Value {
        let points = self.between(10, 200);
        let start = 1_700_000_000 + self.0.below(10_000_000);
        let step = [10, 15, 30, 60][self.0.below(4) as usize];
        let series: Value = (0..self.between(2, 12))
            .map(|_| {
                json!({
                    "metric": self.pick(METRICS),
                    "labels": {
                        "service": self.pick(SERVICES),
                        "region": self.pick(REGIONS),
                        "instance": format!("10.{}.{}.{}:9090", self.0.below(256), self.0.below(256), self.0.below(256)),
                        "status": self.pick(&["200", "404", "500"]),
                    },
                    "timestamps": (0..points).map(|i| json!(start + i * step)).collect::<Value>(),
                    "values": self.floats(points, 1000, 5),
                    "counts": self.ints(points, 100_000),
                })
            })
            .collect();
        json!({
            "status": "success",
            "query": { "expr": format!("rate({}[5m])", self.pick(METRICS)), "start": start, "step": step },
            "data": { "result_type": "matrix", "series": series },
            "stats": { "took_ms": self.float(500, 3), "samples_scanned": self.0.below(10_000_000) },
        })
    }

    /// Log records: request context nested 4 levels in each.
    fn events(&mut self) -> Value {
        let events: Value = (0..self.between(20, 100))
            .map(|_| {
                let mut event = Map::new();
                event.insert("id".into(), json!(self.hex(20)));
                event.insert("ts".into(), json!(self.timestamp()));
                event.insert("level".into(), json!(self.pick(LEVELS)));
                event.insert(
                    "logger".into(),
                    json!(format!("{}.{}.{}", self.0.word(), self.0.word(), self.0.word())),
                );
                let words = self.between(5, 30);
                event.insert("message".into(), json!(self.text(words)));
                event.insert("trace_id".into(), json!(self.hex(32)));
                event.insert("span_id".into(), json!(self.hex(16)));
                let path = format!("/v2/{}/{}", self.pick(TYPES), self.hex(8));
                let status = [200, 201, 204, 400, 404, 500][self.0.below(6) as usize];
                let mut context = Map::new();
                context.insert(
                    "http".into(),
                    json!({ "method": self.pick(METHODS), "path": path, "status": status,
                            "duration_ms": self.float(2000, 3) }),
                );
                self.optional(
                    &mut context,
                    "user",
                    30,
                    20,
                    |g| json!({ "id": g.hex(24), "ip": format!("192.168.{}.{}", g.0.below(256), g.0.below(256)) }),
                );
                event.insert("context".into(), Value::Object(context));
                self.optional(&mut event, "stack", 0, 95, |g| {
                    let words = g.between(100, 400);
                    json!(g.text(words))
                });
                Value::Object(event)
            })
            .collect();
        let mut batch = Map::new();
        batch.insert("events".into(), events);
        self.optional(&mut batch, "next_cursor", 30, 0, |g| json!(g.hex(40)));
        Value::Object(batch)
    }

    /// An article with a comment thread: the long text fields.
    fn article(&mut self) -> Value {
        let comments: Value = (0..self.between(0, 40))
            .map(|_| {
                let replies: Value = (0..self.0.below(4))
                    .map(|_| {
                        let words = self.between(3, 40);
                        json!({ "id": self.hex(12), "author": self.user(), "body": self.text(words),
                                "created_at": self.timestamp() })
                    })
                    .collect();
                let words = self.between(5, 60);
                json!({
                    "id": self.hex(12),
                    "author": self.user(),
                    "body": self.text(words),
                    "created_at": self.timestamp(),
                    "reactions": { "+1": self.0.below(50), "heart": self.0.below(20), "rocket": self.0.below(5) },
                    "replies": replies,
                })
            })
            .collect();
        let mut article = Map::new();
        article.insert("id".into(), json!(self.uuid()));
        let words = self.between(4, 12);
        article.insert("title".into(), json!(self.text(words)));
        article.insert("author".into(), self.user());
        article.insert("published_at".into(), json!(self.timestamp()));
        self.optional(&mut article, "edited_at", 50, 20, |g| json!(g.timestamp()));
        let words = self.between(20, 60);
        article.insert("summary".into(), json!(self.text(words)));
        let words = self.between(300, 1500);
        article.insert("body".into(), json!(self.text(words)));
        let tags = self.between(1, 8);
        article.insert("tags".into(), self.words(tags));
        article.insert("comments".into(), comments);
        Value::Object(article)
    }

    fn document(&mut self) -> Value {
        match self.0.below(20) {
            0..=7 => self.page(),
            8..=10 => self.order(),
            11..=13 => self.timeseries(),
            14..=16 => self.events(),
            _ => self.article(),
        }
    }
}

fn url(path: &str, id: &str) -> String {
    format!("https://api.example.com/v2/{path}/{id}")
}

fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map_or(String::new(), |c| c.to_ascii_uppercase().to_string() + chars.as_str())
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// The corpus as compact JSON texts, generated from `seed` until they hold `bytes` bytes.
/// Each text serializes back to itself once parsed (checked here), so the measured
/// round trip redoes exactly this work.
pub fn generate(seed: u64, bytes: usize) -> Vec<String> {
    let mut generator = Gen(Rng::new(seed));
    let mut texts = Vec::new();
    let mut total = 0;
    while total < bytes {
        let text = serde_json::to_string(&generator.document()).expect("serialize");
        let again = serde_json::to_string(&serde_json::from_str::<Value>(&text).expect("parse")).expect("serialize");
        assert_eq!(again, text, "a corpus document does not round-trip");
        total += text.len();
        texts.push(text);
    }
    texts
}
