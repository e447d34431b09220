//! What this server did with each certificate it presented to the broker, by SAB request
//! id: a tool call the host cancelled (its timeout) still runs to its end, and the model
//! asking `request_status` afterwards learns the certificate was spent and how it went,
//! instead of being told it is ready to present again. Bounded: the newest
//! [`MAX_REMEMBERED`] requests.

use std::collections::{HashMap, VecDeque};

use serde_json::{Value, json};

pub const MAX_REMEMBERED: usize = 1024;

#[derive(Default)]
pub struct Presented {
    order: VecDeque<String>,
    results: HashMap<String, Value>,
}

impl Presented {
    /// The certificate of `request_id` is being presented; its result is not known yet.
    pub fn started(&mut self, request_id: &str) {
        if !self.results.contains_key(request_id) {
            self.order.push_back(request_id.to_string());
            if self.order.len() > MAX_REMEMBERED
                && let Some(oldest) = self.order.pop_front()
            {
                self.results.remove(&oldest);
            }
        }
        self.results.insert(request_id.to_string(), json!({"status": "in_flight"}));
    }

    /// What presenting it came to (the tool's result).
    pub fn finished(&mut self, request_id: &str, result: Value) {
        if let Some(slot) = self.results.get_mut(request_id) {
            *slot = result;
        }
    }

    /// `state` (the SAB's answer about `request_id`) with what this server did with its
    /// certificate, if it presented it: then the certificate is no longer ready.
    pub fn annotate(&self, request_id: &str, state: &mut Value) {
        let Some(result) = self.results.get(request_id) else { return };
        if let Some(object) = state.as_object_mut() {
            object.insert("certificate_ready".into(), json!(false));
            object.insert("presented_to_broker".into(), result.clone());
            object.insert(
                "next".into(),
                json!(
                    "This request's certificate was already presented to the broker (`presented_to_broker` says \
                       how it went): do not propose it again. If its status is `outcome_unknown` or `in_flight`, \
                       read the resource before anything else."
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_presented_certificate_is_not_reported_ready_and_the_memory_is_bounded() {
        let mut presented = Presented::default();
        presented.started("r1");
        let mut state = json!({"status": "issued", "certificate_ready": true});
        presented.annotate("r1", &mut state);
        assert_eq!(
            (state["certificate_ready"].clone(), state["presented_to_broker"]["status"].clone()),
            (json!(false), json!("in_flight"))
        );
        presented.finished("r1", json!({"status": "executed", "decision_id": "d"}));
        let mut state = json!({"status": "issued", "certificate_ready": true});
        presented.annotate("r1", &mut state);
        assert_eq!(state["presented_to_broker"]["status"], "executed");
        // Another request's state is left as the SAB gave it.
        let mut other = json!({"status": "issued", "certificate_ready": true});
        presented.annotate("r2", &mut other);
        assert_eq!(other, json!({"status": "issued", "certificate_ready": true}));
        for i in 0..MAX_REMEMBERED {
            presented.started(&format!("x{i}"));
        }
        assert_eq!((presented.results.len(), presented.order.len()), (MAX_REMEMBERED, MAX_REMEMBERED));
        let mut forgotten = json!({"status": "issued"});
        presented.annotate("r1", &mut forgotten);
        assert!(forgotten.get("presented_to_broker").is_none(), "the oldest is forgotten first");
    }
}
