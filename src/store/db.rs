//! The store's one seam over its two databases: embedded SQLite (the default) and PostgreSQL
//! (fleet mode, `[agent] database_url_env`). [`Conn`] has the small rusqlite-shaped surface
//! the store and the modules that add tables use (`execute`, `query_row`, `prepare_cached`,
//! `query_map`, `optional`), and every query is written once, in the SQL both dialects agree
//! on: `?N` placeholders (rewritten to `$N` for Postgres), `ON CONFLICT … DO UPDATE`,
//! `RETURNING`, `IN (SELECT … LIMIT n)` instead of `DELETE … LIMIT`.
//!
//! Migrations are shared too: a [`super::MIGRATIONS`] entry is SQLite DDL, and [`pg_ddl`]
//! maps its types for Postgres (`INTEGER` → `BIGINT`, `INTEGER PRIMARY KEY` → an identity
//! column, `BLOB` → `BYTEA`, `REAL` → `DOUBLE PRECISION`, no `WITHOUT ROWID`). A line
//! starting `-- postgres:` is a comment to SQLite and a statement to Postgres, for the rare
//! step only Postgres needs.
//!
//! Postgres goes through tokio-postgres with a deadpool pool, TLS by rustls (`sslmode` in
//! the URL), a server-side `statement_timeout` and a client-side deadline on every call.
//! Its futures run on a small runtime of their own ([`block`]), so the store's blocking
//! callers (the writer thread, `spawn_blocking` readers) use both databases the same way.
//!
//! Not here: what the tables mean. Rows are materialised per query on Postgres (the store's
//! queries are bounded: one series' window, a list capped by `LIMIT`); SQLite streams.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_postgres::types::{IsNull, Type};

/// How long Postgres may work on one statement (server side, `statement_timeout`).
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call may take end to end (connect, queue, statement, answer).
pub const CALL_DEADLINE: Duration = Duration::from_secs(15);
/// Connections a Postgres store keeps at most (the writer plus concurrent readers).
pub const POOL_SIZE: usize = 8;

/// Errors from either database, typed where the store acts on them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {message}")]
    Postgres {
        message: String,
        /// The connection is gone (server down, network): worth buffering and retrying.
        lost: bool,
    },
    #[error("query returned no rows")]
    NoRows,
    #[error("column {0}: {1}")]
    Column(usize, String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True when the database could not be reached (as opposed to a bad statement).
    pub fn is_connection(&self) -> bool {
        matches!(self, Error::Postgres { lost: true, .. })
    }

    fn pg(e: tokio_postgres::Error) -> Error {
        let message = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => {
                let mut m = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    m.push_str(": ");
                    m.push_str(&s.to_string());
                    src = s.source();
                }
                m
            }
        };
        let lost = e.is_closed()
            || match e.code() {
                Some(code) => connection_class(code.code()),
                None => e.as_db_error().is_none(),
            };
        Error::Postgres { message, lost }
    }

    fn pool(e: deadpool_postgres::PoolError) -> Error {
        match e {
            deadpool_postgres::PoolError::Backend(e) => Error::pg(e),
            e => Error::Postgres {
                message: e.to_string(),
                lost: true,
            },
        }
    }
}

/// SQLSTATEs that mean the server went away or refuses connections, not that a statement
/// was wrong: class 08 (connection exception), 57P01–57P03 (the server is shutting down,
/// crashed, or not accepting connections yet) and 53300 (too many connections). A shutdown
/// reaches a statement in flight as one of these before the socket closes.
fn connection_class(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

/// `Result<T>` → `Result<Option<T>>` with "no rows" as `None` (rusqlite's `optional`).
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(Error::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A value bound to or read from a statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// Something that can be bound as a parameter.
pub trait ToSql {
    fn to_value(&self) -> Value;
}

macro_rules! int_to_sql {
    ($($t:ty),*) => {$(
        impl ToSql for $t {
            fn to_value(&self) -> Value {
                Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
            }
        }
    )*};
}
int_to_sql!(i64, i32, u32, u64, usize, u16, u8);

impl ToSql for bool {
    fn to_value(&self) -> Value {
        Value::Int(*self as i64)
    }
}
impl ToSql for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}
impl ToSql for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_string())
    }
}
impl ToSql for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl ToSql for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl ToSql for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}
impl ToSql for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}
impl<T: ToSql + ?Sized> ToSql for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl<T: ToSql> ToSql for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToSql::to_value)
    }
}

/// Statement parameters: `params![a, b]`, `[x]`, `[]`.
pub trait Params {
    fn into_values(self) -> Vec<Value>;
}

impl Params for &[&dyn ToSql] {
    fn into_values(self) -> Vec<Value> {
        self.iter().map(|v| v.to_value()).collect()
    }
}
impl Params for [&dyn ToSql; 0] {
    fn into_values(self) -> Vec<Value> {
        Vec::new()
    }
}
impl Params for Vec<Value> {
    fn into_values(self) -> Vec<Value> {
        self
    }
}
macro_rules! array_params {
    ($($n:literal),*) => {$(
        impl<T: ToSql> Params for [T; $n] {
            fn into_values(self) -> Vec<Value> {
                self.iter().map(ToSql::to_value).collect()
            }
        }
    )*};
}
array_params!(1, 2, 3, 4, 5, 6, 7, 8);

/// `params![a, b, …]`: parameters of mixed types.
#[macro_export]
macro_rules! params {
    () => { &[] as &[&dyn $crate::store::db::ToSql] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::store::db::ToSql),+] as &[&dyn $crate::store::db::ToSql] };
}
pub use crate::params;

/// A value read from a column.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> std::result::Result<Self, String>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Int(i) => Ok(*i),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }
}
macro_rules! narrow_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value) -> std::result::Result<Self, String> {
                let i = i64::from_value(v)?;
                <$t>::try_from(i).map_err(|_| format!("{i} is out of range"))
            }
        }
    )*};
}
narrow_from_value!(i32, u32, u64, usize);

impl FromValue for bool {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        Ok(i64::from_value(v)? != 0)
    }
}
impl FromValue for f64 {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Real(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            other => Err(format!("expected a number, found {other:?}")),
        }
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            other => Err(format!("expected text, found {other:?}")),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            Value::Text(s) => Ok(s.as_bytes().to_vec()),
            other => Err(format!("expected a blob, found {other:?}")),
        }
    }
}
impl FromValue for Value {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        Ok(v.clone())
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// One result row.
#[derive(Debug, Clone, Default)]
pub struct Row(Vec<Value>);

impl Row {
    pub fn get<I: RowIndex, T: FromValue>(&self, i: I) -> Result<T> {
        let i = i.index();
        let v = self
            .0
            .get(i)
            .ok_or_else(|| Error::Column(i, "no such column".into()))?;
        T::from_value(v).map_err(|e| Error::Column(i, e))
    }

    /// A text column without copying (`None` for NULL or another type).
    pub fn text(&self, i: usize) -> Option<&str> {
        match self.0.get(i) {
            Some(Value::Text(t)) => Some(t),
            _ => None,
        }
    }

    /// A blob column without copying (empty for NULL or another type).
    pub fn blob(&self, i: usize) -> &[u8] {
        match self.0.get(i) {
            Some(Value::Blob(b)) => b,
            _ => &[],
        }
    }
}

/// A column position (rusqlite's `r.get::<_, T>(i)` shape).
pub trait RowIndex {
    fn index(self) -> usize;
}

impl RowIndex for usize {
    fn index(self) -> usize {
        self
    }
}

/// A statement bound to its connection (rusqlite's `prepare_cached(sql)?.execute(…)` shape;
/// both databases cache the prepared form per connection).
pub struct Stmt<'c> {
    conn: &'c Conn,
    sql: String,
}

impl Stmt<'_> {
    pub fn execute(&mut self, params: impl Params) -> Result<usize> {
        self.conn.execute(&self.sql, params)
    }

    pub fn query_row<T>(
        &mut self,
        params: impl Params,
        f: impl FnOnce(&Row) -> Result<T>,
    ) -> Result<T> {
        self.conn.query_row(&self.sql, params, f)
    }

    /// Every row through `f`, as an iterator of results (collect into `Result<Vec<_>>`).
    pub fn query_map<T>(
        &mut self,
        params: impl Params,
        mut f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<std::vec::IntoIter<Result<T>>> {
        let mut out = Vec::new();
        self.conn.query_each(&self.sql, params, |r| {
            out.push(f(r));
            Ok(())
        })?;
        Ok(out.into_iter())
    }

    pub fn query_each(
        &mut self,
        params: impl Params,
        f: impl FnMut(&Row) -> Result<()>,
    ) -> Result<()> {
        self.conn.query_each(&self.sql, params, f)
    }
}

/// Which database a store lives in.
#[derive(Clone)]
pub enum Target {
    Sqlite(std::path::PathBuf),
    Postgres(Pg),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Sqlite(p) => write!(f, "sqlite {}", p.display()),
            Target::Postgres(pg) => write!(f, "postgres (location {})", pg.location),
        }
    }
}

/// A Postgres store: its pool and the agent's location (every run is recorded with it).
#[derive(Clone)]
pub struct Pg {
    pool: deadpool_postgres::Pool,
    pub location: String,
    /// Where the writer keeps runs while this database is unreachable (none: they are lost).
    pub buffer: Option<super::buffer::Spec>,
}

impl Pg {
    /// A pool for `url` (`postgres://…`; `sslmode=disable|prefer|require` picks TLS).
    /// Connects lazily: nothing is dialled until the first call.
    pub fn new(url: &str, location: &str) -> anyhow::Result<Pg> {
        let mut cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| anyhow::anyhow!("database URL is not a valid postgres:// URL: {e}"))?;
        cfg.options(format!(
            "-c statement_timeout={}",
            STATEMENT_TIMEOUT.as_millis()
        ));
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(5));
        }
        cfg.application_name("watchpost");
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
        let mgr = deadpool_postgres::Manager::from_config(
            cfg,
            tls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(mgr)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CALL_DEADLINE))
            .create_timeout(Some(CALL_DEADLINE))
            .recycle_timeout(Some(CALL_DEADLINE))
            .build()?;
        Ok(Pg {
            pool,
            location: location.to_string(),
            buffer: None,
        })
    }

    /// Buffer runs in `spec` while the database is unreachable.
    pub fn with_buffer(mut self, spec: super::buffer::Spec) -> Pg {
        self.buffer = Some(spec);
        self
    }

    /// A connection from the pool.
    pub fn conn(&self) -> Result<Conn> {
        let pool = self.pool.clone();
        let obj = block(async move { pool.get().await.map_err(Error::pool) })?;
        Ok(Conn {
            inner: Inner::Postgres {
                client: Arc::new(obj),
                cache: RefCell::new(HashMap::new()),
            },
            location: RefCell::new(self.location.clone()),
        })
    }
}

/// The runtime Postgres futures run on: one worker thread, started on first use.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("watchpost-pg")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the Postgres runtime: {e}"))
    })
}

/// Run `fut` on the Postgres runtime and wait for it, within [`CALL_DEADLINE`]. Callable
/// from any thread, including from inside another runtime (it blocks like a SQLite call).
fn block<T: Send + 'static>(fut: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let r = match tokio::time::timeout(CALL_DEADLINE, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::Postgres {
                message: format!("no answer within {CALL_DEADLINE:?}"),
                lost: true,
            }),
        };
        let _ = tx.send(r);
    });
    rx.recv().unwrap_or_else(|_| {
        Err(Error::Postgres {
            message: "the Postgres runtime stopped".into(),
            lost: true,
        })
    })
}

enum Inner {
    Sqlite(rusqlite::Connection),
    Postgres {
        client: Arc<deadpool_postgres::Object>,
        cache: RefCell<HashMap<String, tokio_postgres::Statement>>,
    },
}

/// One connection to the store's database.
pub struct Conn {
    inner: Inner,
    /// Whose series it reads and writes; a reader may switch it ([`Conn::read_as`]).
    location: RefCell<String>,
}

impl Conn {
    /// A SQLite connection (single machine: its location is empty).
    pub fn sqlite(c: rusqlite::Connection) -> Conn {
        Conn {
            inner: Inner::Sqlite(c),
            location: RefCell::new(String::new()),
        }
    }

    /// The location whose series this connection reads and writes (`""` on SQLite).
    pub fn location(&self) -> String {
        self.location.borrow().clone()
    }

    /// Read the series (and the per-location bookkeeping) of `location` from now on: the
    /// fleet's views read each location in turn (see `store::each_location`). Readers only;
    /// the writer's connection stays with the agent's own location.
    pub fn read_as(&self, location: &str) {
        *self.location.borrow_mut() = location.to_string();
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.inner, Inner::Postgres { .. })
    }

    /// The SQLite connection underneath, for what only SQLite has (pragmas, checkpoints).
    pub fn as_sqlite(&self) -> Option<&rusqlite::Connection> {
        match &self.inner {
            Inner::Sqlite(c) => Some(c),
            Inner::Postgres { .. } => None,
        }
    }

    /// Run statements without parameters (several, separated by `;`).
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match &self.inner {
            Inner::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Inner::Postgres { client, .. } => {
                let (client, sql) = (client.clone(), sql.to_string());
                block(async move { client.batch_execute(&sql).await.map_err(Error::pg) })
            }
        }
    }

    /// Run one statement; returns the rows it changed.
    pub fn execute(&self, sql: &str, params: impl Params) -> Result<usize> {
        let values = params.into_values();
        match &self.inner {
            Inner::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                Ok(st.execute(rusqlite::params_from_iter(values.iter().map(sqlite_value)))?)
            }
            Inner::Postgres { client, .. } => {
                let st = self.pg_statement(sql)?;
                let client = client.clone();
                let n = block(async move {
                    let binds = pg_binds(&values, st.params());
                    client
                        .execute_raw(&st, binds.iter().map(|b| b as &dyn PgToSql))
                        .await
                        .map_err(Error::pg)
                })?;
                Ok(n as usize)
            }
        }
    }

    /// Call `f` for every row of a query.
    pub fn query_each(
        &self,
        sql: &str,
        params: impl Params,
        mut f: impl FnMut(&Row) -> Result<()>,
    ) -> Result<()> {
        let values = params.into_values();
        match &self.inner {
            Inner::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let n = st.column_count();
                let mut rows =
                    st.query(rusqlite::params_from_iter(values.iter().map(sqlite_value)))?;
                let mut row = Row(Vec::with_capacity(n));
                while let Some(r) = rows.next()? {
                    row.0.clear();
                    for i in 0..n {
                        row.0.push(match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => Value::Null,
                            rusqlite::types::ValueRef::Integer(i) => Value::Int(i),
                            rusqlite::types::ValueRef::Real(f) => Value::Real(f),
                            rusqlite::types::ValueRef::Text(t) => {
                                Value::Text(String::from_utf8_lossy(t).into_owned())
                            }
                            rusqlite::types::ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                        });
                    }
                    f(&row)?;
                }
                Ok(())
            }
            Inner::Postgres { client, .. } => {
                let st = self.pg_statement(sql)?;
                let client = client.clone();
                let rows = block(async move {
                    let binds = pg_binds(&values, st.params());
                    let rows = client
                        .query(
                            &st,
                            &binds
                                .iter()
                                .map(|b| b as &(dyn tokio_postgres::types::ToSql + Sync))
                                .collect::<Vec<_>>(),
                        )
                        .await
                        .map_err(Error::pg)?;
                    rows.iter().map(pg_row).collect::<Result<Vec<Row>>>()
                })?;
                for r in &rows {
                    f(r)?;
                }
                Ok(())
            }
        }
    }

    /// The first row of a query through `f`; [`Error::NoRows`] when there is none.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnOnce(&Row) -> Result<T>,
    ) -> Result<T> {
        let mut first: Option<Row> = None;
        self.query_each(sql, params, |r| {
            if first.is_none() {
                first = Some(r.clone());
            }
            Ok(())
        })?;
        match first {
            Some(r) => f(&r),
            None => Err(Error::NoRows),
        }
    }

    /// Every row of a query through `f`.
    pub fn query_map<T>(
        &self,
        sql: &str,
        params: impl Params,
        mut f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        self.query_each(sql, params, |r| {
            out.push(f(r)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Whether a table exists (in the current schema, on Postgres).
    pub fn table_exists(&self, name: &str) -> Result<bool> {
        let sql = if self.is_postgres() {
            "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?1"
        } else {
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1"
        };
        self.query_row(sql, [name], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
    }

    /// A table's column names, in order (empty when there is no such table).
    pub fn columns(&self, table: &str) -> Result<Vec<String>> {
        let sql = if self.is_postgres() {
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = ?1 ORDER BY ordinal_position"
        } else {
            "SELECT name FROM pragma_table_info(?1) ORDER BY cid"
        };
        self.query_map(sql, [table], |r| r.get(0))
    }

    /// A statement to run once or many times.
    pub fn prepare(&self, sql: &str) -> Result<Stmt<'_>> {
        Ok(Stmt {
            conn: self,
            sql: sql.to_string(),
        })
    }

    /// The same as [`Conn::prepare`]: every statement is cached per connection.
    pub fn prepare_cached(&self, sql: &str) -> Result<Stmt<'_>> {
        self.prepare(sql)
    }

    /// Start a transaction (commit with [`Conn::commit`]; [`Conn::rollback`] on error).
    pub fn begin(&self) -> Result<()> {
        self.execute_batch("BEGIN")
    }

    pub fn commit(&self) -> Result<()> {
        self.execute_batch("COMMIT")
    }

    pub fn rollback(&self) -> Result<()> {
        self.execute_batch("ROLLBACK")
    }

    fn pg_statement(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        let Inner::Postgres { client, cache } = &self.inner else {
            return Err(Error::Other("not a Postgres connection".into()));
        };
        if let Some(st) = cache.borrow().get(sql) {
            return Ok(st.clone());
        }
        let (c, text) = (client.clone(), pg_sql(sql));
        let st = block(async move { c.prepare(&text).await.map_err(Error::pg) })?;
        cache.borrow_mut().insert(sql.to_string(), st.clone());
        Ok(st)
    }
}

fn sqlite_value(v: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match v {
        Value::Null => V::Null,
        Value::Int(i) => V::Integer(*i),
        Value::Real(f) => V::Real(*f),
        Value::Text(s) => V::Text(s.clone()),
        Value::Blob(b) => V::Blob(b.clone()),
    }
}

use tokio_postgres::types::ToSql as PgToSql;

/// A value bound to a Postgres parameter of the type the server inferred for it.
#[derive(Debug)]
struct PgBind(Value, Type);

fn pg_binds(values: &[Value], types: &[Type]) -> Vec<PgBind> {
    values
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&Type::TEXT)))
        .map(|(v, t)| PgBind(v.clone(), t.clone()))
        .collect()
}

impl PgToSql for PgBind {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let ty = &self.1;
        let bad = || -> Box<dyn std::error::Error + Sync + Send> {
            format!("cannot bind {:?} as {ty}", self.0).into()
        };
        match &self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i).map_err(|_| bad())?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i).map_err(|_| bad())?.to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::FLOAT4 => (*i as f32).to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => i.to_string().to_sql(ty, out),
                _ => Err(bad()),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                Type::INT8 if f.fract() == 0.0 => (*f as i64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => f.to_string().to_sql(ty, out),
                _ => Err(bad()),
            },
            Value::Text(s) => match *ty {
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    s.as_str().to_sql(&Type::TEXT, out)
                }
                Type::BYTEA => s.as_bytes().to_sql(ty, out),
                _ => Err(bad()),
            },
            Value::Blob(b) => match *ty {
                Type::BYTEA => b.as_slice().to_sql(ty, out),
                _ => Err(bad()),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

fn pg_row(r: &tokio_postgres::Row) -> Result<Row> {
    let mut out = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let e = |e: tokio_postgres::Error| Error::Column(i, e.to_string());
        let v = match *col.type_() {
            Type::INT8 => r.try_get::<_, Option<i64>>(i).map_err(e)?.map(Value::Int),
            Type::INT4 => r
                .try_get::<_, Option<i32>>(i)
                .map_err(e)?
                .map(|v| Value::Int(v.into())),
            Type::INT2 => r
                .try_get::<_, Option<i16>>(i)
                .map_err(e)?
                .map(|v| Value::Int(v.into())),
            Type::BOOL => r
                .try_get::<_, Option<bool>>(i)
                .map_err(e)?
                .map(|v| Value::Int(v.into())),
            Type::FLOAT8 => r.try_get::<_, Option<f64>>(i).map_err(e)?.map(Value::Real),
            Type::FLOAT4 => r
                .try_get::<_, Option<f32>>(i)
                .map_err(e)?
                .map(|v| Value::Real(v.into())),
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i).map_err(e)?.map(Value::Blob),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                r.try_get::<_, Option<String>>(i).map_err(e)?.map(Value::Text)
            }
            ref t => {
                return Err(Error::Column(
                    i,
                    format!("unsupported Postgres type {t} (cast it to bigint, float8 or text in the query)"),
                ))
            }
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

/// A query in the shared dialect as Postgres text: `?N` → `$N`, a bare `?` → the next `$N`
/// (outside string literals and quoted names).
pub fn pg_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    let mut next = 1;
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                out.push(c);
                if c == q {
                    quote = None;
                }
            }
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '?' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                out.push('$');
                if digits.is_empty() {
                    out.push_str(&next.to_string());
                    next += 1;
                } else {
                    out.push_str(&digits);
                }
            }
            None => out.push(c),
        }
    }
    out
}

/// A SQLite migration as Postgres DDL (see the module docs).
pub fn pg_ddl(sql: &str) -> String {
    static RULES: OnceLock<Vec<(regex::Regex, &'static str)>> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        [
            (r"(?im)^\s*--\s*postgres:\s*", ""),
            (
                r"(?i)\bINTEGER\s+PRIMARY\s+KEY(\s+AUTOINCREMENT)?\b",
                "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
            ),
            (r"(?i)\bINTEGER\b", "BIGINT"),
            (r"(?i)\bREAL\b", "DOUBLE PRECISION"),
            (r"(?i)\bBLOB\b", "BYTEA"),
            (r"(?i)\)\s*WITHOUT\s+ROWID", ")"),
        ]
        .into_iter()
        .filter_map(|(re, to)| Some((regex::Regex::new(re).ok()?, to)))
        .collect()
    });
    let mut s = sql.to_string();
    for (re, to) in rules {
        s = re.replace_all(&s, *to).into_owned();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_numbered() {
        assert_eq!(
            pg_sql("SELECT a FROM t WHERE x = ?1 AND y = ?2 OR z = ?1"),
            "SELECT a FROM t WHERE x = $1 AND y = $2 OR z = $1"
        );
        assert_eq!(pg_sql("VALUES (?, ?)"), "VALUES ($1, $2)");
        assert_eq!(
            pg_sql("SELECT '?1', \"a?\" , ?3"),
            "SELECT '?1', \"a?\" , $3"
        );
    }

    #[test]
    fn connection_loss_is_told_from_a_bad_statement() {
        for code in ["08006", "08001", "57P01", "57P02", "57P03", "53300"] {
            assert!(connection_class(code), "{code}");
        }
        // unique violation, syntax error, statement timeout, serialization failure
        for code in ["23505", "42601", "57014", "40001"] {
            assert!(!connection_class(code), "{code}");
        }
    }

    #[test]
    fn ddl_maps_types() {
        let ddl = "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER NOT NULL, r REAL, b BLOB,
            PRIMARY KEY (n)) WITHOUT ROWID;
            -- postgres: ALTER TABLE t DROP CONSTRAINT x;
            -- a comment";
        let pg = pg_ddl(ddl);
        assert!(
            pg.contains("id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"),
            "{pg}"
        );
        assert!(
            pg.contains("n BIGINT NOT NULL, r DOUBLE PRECISION, b BYTEA"),
            "{pg}"
        );
        assert!(pg.contains("PRIMARY KEY (n));"), "{pg}");
        assert!(pg.contains("\nALTER TABLE t DROP CONSTRAINT x;"), "{pg}");
        assert!(pg.contains("-- a comment"), "{pg}");
    }
}
