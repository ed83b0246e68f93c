#include "bioquant/eval/store.h"

#include <algorithm>
#include <filesystem>
#include <memory>

#include <sqlite3.h>

#include "bioquant/core/error.h"

namespace bioquant::eval {

using nlohmann::json;

namespace {

struct Column {
  const char* name;
  const char* type;
};

const std::vector<Column>& columns() {
  static const std::vector<Column> cols = {
      {"created_at", "TEXT"},        {"run_id", "TEXT"},          {"config_hash", "TEXT"},
      {"bioquant_version", "TEXT"},  {"model", "TEXT"},           {"model_hash", "TEXT"},
      {"quant", "TEXT"},             {"backend", "TEXT"},         {"device", "TEXT"},
      {"threads", "INTEGER"},        {"task", "TEXT"},            {"split", "TEXT"},
      {"method", "TEXT"},            {"shots", "INTEGER"},        {"seed", "INTEGER"},
      {"scoring", "TEXT"},           {"prompt_style", "TEXT"},    {"chat_template", "INTEGER"},
      {"metric", "TEXT"},            {"score", "REAL"},           {"ci_low", "REAL"},
      {"ci_high", "REAL"},           {"n", "INTEGER"},            {"unparsed", "INTEGER"},
      {"prompt_tokens_computed", "INTEGER"}, {"prompt_tokens_reused", "INTEGER"},
      {"generated_tokens", "INTEGER"}, {"seconds", "REAL"},       {"peak_rss_bytes", "INTEGER"},
      {"weight_bytes", "INTEGER"},   {"config_json", "TEXT"},     {"result_json", "TEXT"},
      {"out_dir", "TEXT"},           {"samples", "TEXT"},         {"sweep_cell", "TEXT"},
      // The GPU's peak use (cudaMemGetInfo, the CUDA context included) of a run on a GPU; NULL on the CPU.
      {"gpu_peak_bytes", "INTEGER"},
  };
  return cols;
}

struct DbCloser {
  void operator()(sqlite3* db) const { sqlite3_close(db); }
};
struct StmtCloser {
  void operator()(sqlite3_stmt* s) const { sqlite3_finalize(s); }
};
using Db = std::unique_ptr<sqlite3, DbCloser>;
using Stmt = std::unique_ptr<sqlite3_stmt, StmtCloser>;

Db open_db(const std::string& path, bool create) {
  sqlite3* raw = nullptr;
  const int flags = create ? (SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) : SQLITE_OPEN_READONLY;
  const int rc = sqlite3_open_v2(path.c_str(), &raw, flags, nullptr);
  Db db(raw);
  check(rc == SQLITE_OK, "results database " + path + ": " + (raw ? sqlite3_errmsg(raw) : sqlite3_errstr(rc)));
  sqlite3_busy_timeout(raw, 10000);  // another eval writing the same database: wait, don't fail
  return db;
}

// SQLite's message for a failed call. The call must run before its message is read: as one argument of
// check(call() == OK, ... + sqlite3_errmsg(db)) the message may be built first ("not an error").
void check_sql(int rc, int want, sqlite3* db, const std::string& path) {
  if (rc != want) throw Error("results database " + path + ": " + sqlite3_errmsg(db));
}

void exec(sqlite3* db, const std::string& sql, const std::string& path) {
  char* message = nullptr;
  if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &message) != SQLITE_OK) {
    std::string m = message ? message : "unknown error";
    sqlite3_free(message);
    throw Error("results database " + path + ": " + m);
  }
}

}  // namespace

const std::vector<std::string>& run_columns() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const auto& c : columns()) out.emplace_back(c.name);
    return out;
  }();
  return names;
}

void record_runs(const std::string& db_path, const std::vector<json>& rows) {
  Db db = open_db(db_path, true);
  std::string create = "CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY AUTOINCREMENT";
  for (const auto& c : columns()) create.append(", ").append(c.name).append(" ").append(c.type);
  create += ")";
  exec(db.get(), create, db_path);
  // Databases made by an older BioQuant gain the columns added since.
  {
    sqlite3_stmt* raw = nullptr;
    const int rc = sqlite3_prepare_v2(db.get(), "PRAGMA table_info(runs)", -1, &raw, nullptr);
    Stmt info(raw);
    check_sql(rc, SQLITE_OK, db.get(), db_path);
    std::vector<std::string> have;
    while (sqlite3_step(info.get()) == SQLITE_ROW)
      have.emplace_back(reinterpret_cast<const char*>(sqlite3_column_text(info.get(), 1)));
    for (const auto& c : columns())
      if (std::find(have.begin(), have.end(), c.name) == have.end())
        exec(db.get(), std::string("ALTER TABLE runs ADD COLUMN ") + c.name + " " + c.type, db_path);
  }
  std::string insert = "INSERT INTO runs (";
  std::string values = ") VALUES (";
  for (size_t i = 0; i < columns().size(); ++i) {
    insert.append(i ? ", " : "").append(columns()[i].name);
    values.append(i ? ", ?" : "?");
  }
  insert += values + ")";
  exec(db.get(), "BEGIN IMMEDIATE", db_path);
  try {
    sqlite3_stmt* raw = nullptr;
    const int rc = sqlite3_prepare_v2(db.get(), insert.c_str(), -1, &raw, nullptr);
    Stmt stmt(raw);
    check_sql(rc, SQLITE_OK, db.get(), db_path);
    for (const json& row : rows) {
      sqlite3_reset(stmt.get());
      sqlite3_clear_bindings(stmt.get());
      for (size_t i = 0; i < columns().size(); ++i) {
        const int at = static_cast<int>(i) + 1;
        auto it = row.find(columns()[i].name);
        if (it == row.end() || it->is_null()) {
          sqlite3_bind_null(stmt.get(), at);
        } else if (it->is_boolean()) {
          sqlite3_bind_int64(stmt.get(), at, it->get<bool>() ? 1 : 0);
        } else if (it->is_number_integer() || it->is_number_unsigned()) {
          sqlite3_bind_int64(stmt.get(), at, it->get<int64_t>());
        } else if (it->is_number_float()) {
          sqlite3_bind_double(stmt.get(), at, it->get<double>());
        } else {
          const std::string text = it->is_string() ? it->get<std::string>() : it->dump();
          sqlite3_bind_text(stmt.get(), at, text.c_str(), static_cast<int>(text.size()), SQLITE_TRANSIENT);
        }
      }
      check_sql(sqlite3_step(stmt.get()), SQLITE_DONE, db.get(), db_path);
    }
    exec(db.get(), "COMMIT", db_path);
  } catch (...) {
    sqlite3_exec(db.get(), "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
}

std::vector<json> read_runs(const std::string& db_path) {
  check(std::filesystem::is_regular_file(db_path), "results database " + db_path + " does not exist");
  Db db = open_db(db_path, false);
  sqlite3_stmt* raw = nullptr;
  const int prepared = sqlite3_prepare_v2(db.get(), "SELECT * FROM runs ORDER BY id", -1, &raw, nullptr);
  Stmt stmt(raw);
  check_sql(prepared, SQLITE_OK, db.get(), db_path);
  std::vector<json> out;
  int rc;
  while ((rc = sqlite3_step(stmt.get())) == SQLITE_ROW) {
    json row = json::object();
    for (int i = 0; i < sqlite3_column_count(stmt.get()); ++i) {
      const char* name = sqlite3_column_name(stmt.get(), i);
      switch (sqlite3_column_type(stmt.get(), i)) {
        case SQLITE_INTEGER: row[name] = sqlite3_column_int64(stmt.get(), i); break;
        case SQLITE_FLOAT: row[name] = sqlite3_column_double(stmt.get(), i); break;
        case SQLITE_NULL: row[name] = nullptr; break;
        default: row[name] = reinterpret_cast<const char*>(sqlite3_column_text(stmt.get(), i));
      }
    }
    out.push_back(std::move(row));
  }
  check_sql(rc, SQLITE_DONE, db.get(), db_path);
  return out;
}

}  // namespace bioquant::eval
