//! Shared helpers of the core's integration tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow::{Node, NodeError, Orchestrator, SagaRecord, Step};

/// What a scripted call does.
#[derive(Clone, Debug)]
pub enum Act {
    Ok,
    Fail(NodeError),
    Sleep(Duration),
    Panic,
}

/// A node whose action and compensation follow a script, recording every call.
pub struct Scripted {
    pub name: &'static str,
    pub calls: Arc<Mutex<Vec<String>>>,
    pub actions: Mutex<VecDeque<Act>>,
    pub compensations: Mutex<VecDeque<Act>>,
    /// What to do once the script runs out.
    pub then_action: Act,
    pub then_compensation: Act,
}

impl Scripted {
    pub fn new(name: &'static str, calls: &Arc<Mutex<Vec<String>>>) -> Self {
        Self {
            name,
            calls: calls.clone(),
            actions: Mutex::default(),
            compensations: Mutex::default(),
            then_action: Act::Ok,
            then_compensation: Act::Ok,
        }
    }

    pub fn actions(self, acts: impl IntoIterator<Item = Act>) -> Self {
        *self.actions.lock().unwrap() = acts.into_iter().collect();
        self
    }

    pub fn always(mut self, act: Act) -> Self {
        self.then_action = act;
        self
    }

    pub fn compensations(self, acts: impl IntoIterator<Item = Act>) -> Self {
        *self.compensations.lock().unwrap() = acts.into_iter().collect();
        self
    }

    pub fn compensation_always(mut self, act: Act) -> Self {
        self.then_compensation = act;
        self
    }
}

async fn perform(act: Act) -> Result<(), NodeError> {
    match act {
        Act::Ok => Ok(()),
        Act::Fail(e) => Err(e),
        Act::Sleep(d) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
        Act::Panic => panic!("scripted panic"),
    }
}

#[sagaflow::async_trait]
impl Node<Vec<String>> for Scripted {
    fn name(&self) -> &str {
        self.name
    }

    async fn action(&self, step: &Step, data: &mut Vec<String>) -> Result<(), NodeError> {
        self.calls.lock().unwrap().push(format!("{}#{}", self.name, step.attempt()));
        let act = self.actions.lock().unwrap().pop_front().unwrap_or_else(|| self.then_action.clone());
        perform(act).await?;
        data.push(self.name.to_owned());
        Ok(())
    }

    async fn compensate(&self, step: &Step, _data: &Vec<String>) -> Result<(), NodeError> {
        self.calls.lock().unwrap().push(format!("undo {}#{}", self.name, step.attempt()));
        let act = self.compensations.lock().unwrap().pop_front().unwrap_or_else(|| self.then_compensation.clone());
        perform(act).await
    }
}

/// Where scripted nodes record their calls.
pub type Calls = Arc<Mutex<Vec<String>>>;

pub fn calls() -> Arc<Mutex<Vec<String>>> {
    Arc::default()
}

pub fn taken(calls: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    calls.lock().unwrap().clone()
}

pub fn unavailable() -> NodeError {
    NodeError::retryable("upstream unavailable").with_code(14)
}

pub fn refused() -> NodeError {
    NodeError::permanent("refused").with_code(9)
}

/// The saga once it has ended; panics after about 30 s (of the test's clock).
pub async fn wait_ended(o: &Orchestrator, id: &str) -> SagaRecord {
    for _ in 0..3000 {
        if let Some(record) = o.saga(id).await.unwrap()
            && record.state.is_ended()
        {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("saga {id} did not end: {:?}", o.saga(id).await.unwrap())
}
