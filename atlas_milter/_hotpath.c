/* atlas_milter._hotpath: the compiled hot path -- the header block, URL scan and HTML walk of
 * message.py and the body block of classifier.py.
 *
 * split_headers(head) is message._split_headers_reference() compiled: a simple header block
 * split into (name, value) pairs.
 *
 * The body block: from a message's lowercased body text (and the few subject / sender-name
 * tokens the Python side adds), the distinct body features -- words, number shapes and word
 * pairs exactly as classifier.features() makes them -- looked up in a hash table built once
 * from the model's weights, summed, counted, and the strongest ones ranked for the reasons.
 * No Python object is made per word, pair or lookup.
 *
 * find_urls(text) is message._URL_RE.findall(text); html_parts(markup) is what
 * message.html_to_text() does before html.unescape(): link targets, <img> count, and the
 * text with scripts, styles, comments and tags as spaces, as message.py's regular
 * expressions define them, in linear time.
 *
 * split_commands(buf, max_packet, prefixes) is adapters/milter/wire.split_commands_reference()
 * compiled: a milter connection's buffer split into packets, each run of header packets
 * gathered into one header block (tests/test_milter_wire.py keeps the two equal).
 *
 * The pure-Python code in classifier.py is the reference: tests/test_hotpath.py proves both
 * give the same features, the same reasons and the same score (to 1e-12: the sum is taken
 * in a different order). Every rule below names the Python it mirrors.
 *
 * Table(weights: dict[str, float], function_words, max_words, max_pairs, scan_chars, top)
 *   .score_body(lowered_text: str, extra: list[str])
 *       -> (n_words, weight_sum, n_known, strongest_spam, strongest_ham)
 *   .body_features(lowered_text, extra) -> list[str]   (for the tests)
 *   .updated(changes: dict[str, float]) -> Table     (a learn's few weights, without a full build)
 *
 * The GIL is held throughout: a Table is read-only once built (updated() makes a new one),
 * and calls need no locking.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define FNV_OFFSET 1469598103934665603ULL
#define FNV_PRIME 1099511628211ULL
#define PREFETCH_AHEAD 8 /* features between a table slot's prefetch and its entry's, and its use */
#define MAX_RUN_WORD 25 /* a run of letters and marks longer than this is cut into words */

static inline uint64_t fnv(uint64_t h, const char *s, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * FNV_PRIME;
    return h;
}

/* memcmp(a, b, n) == 0 for the short keys here, without a call into libc */
static inline int same_bytes(const char *a, const char *b, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

static inline size_t slot_of(uint64_t h, size_t mask)
{
    h ^= h >> 33; /* murmur3's finaliser: FNV's low bits alone spread poorly */
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return (size_t)h & mask;
}

/* ---------------------------------------------------------------- a set of UTF-8 keys */

#define INLINE_KEY 28 /* keys this long or shorter are copied into their entry */

/* One cache line: a lookup that finds the slot reads one more line, key included. */
typedef struct {
    uint64_t hash;
    double weight;
    PyObject *name; /* borrowed from the Table's `keep` list */
    const char *key; /* UTF-8: `inline_key`, or owned by `name` (or by the keys' bytes objects) */
    int32_t len;
    char inline_key[INLINE_KEY];
} Entry;
_Static_assert(sizeof(void *) != 8 || sizeof(Entry) == 64, "an Entry is one cache line");

typedef struct {
    uint32_t tag; /* the hash's top 32 bits: most absent keys are told apart here */
    int32_t at;   /* index into entries, -1 empty */
} Slot;

typedef struct {
    Entry *entries; /* aligned to a cache line, in `memory` */
    void *memory;
    Py_ssize_t n;
    Slot *slots;
    size_t mask;
} KeySet;

static int keyset_init(KeySet *set, Py_ssize_t capacity)
{
    size_t size = 16;
    while (size < (size_t)capacity * 2 + 1)
        size <<= 1;
    set->memory = PyMem_Malloc(((size_t)(capacity ? capacity : 1) + 1) * sizeof(Entry));
    set->entries = (Entry *)(((uintptr_t)set->memory + 63) & ~(uintptr_t)63);
    set->slots = PyMem_Malloc(size * sizeof(Slot));
    if (!set->memory || !set->slots)
        return -1;
    memset(set->slots, 0xff, size * sizeof(Slot));
    set->mask = size - 1;
    set->n = 0;
    return 0;
}

static void keyset_free(KeySet *set)
{
    PyMem_Free(set->memory);
    PyMem_Free(set->slots);
    set->memory = NULL;
    set->entries = NULL;
    set->slots = NULL;
}

static Entry *keyset_find(const KeySet *set, uint64_t h, const char *key, Py_ssize_t len)
{
    uint32_t tag = (uint32_t)(h >> 32);
    for (size_t i = slot_of(h, set->mask);; i = (i + 1) & set->mask) {
        Slot slot = set->slots[i];
        if (slot.at < 0)
            return NULL;
        if (slot.tag != tag)
            continue;
        Entry *e = &set->entries[slot.at];
        if (e->hash == h && e->len == len && same_bytes(e->key, key, len))
            return e;
    }
}

/* Adds the key unless present (capacity was reserved). Returns 1 when added, 0 when present. */
static int keyset_add(KeySet *set, uint64_t h, const char *key, Py_ssize_t len, double weight, PyObject *name)
{
    uint32_t tag = (uint32_t)(h >> 32);
    size_t i = slot_of(h, set->mask);
    for (;; i = (i + 1) & set->mask) {
        Slot slot = set->slots[i];
        if (slot.at < 0)
            break;
        Entry *e = &set->entries[slot.at];
        if (slot.tag == tag && e->hash == h && e->len == len && same_bytes(e->key, key, len))
            return 0;
    }
    Entry *e = &set->entries[set->n];
    e->hash = h;
    if (len <= INLINE_KEY) {
        memcpy(e->inline_key, key, (size_t)len);
        key = e->inline_key;
    }
    e->key = key;
    e->len = (int32_t)len;
    e->weight = weight;
    e->name = name;
    set->slots[i].tag = tag;
    set->slots[i].at = (int32_t)set->n++;
    return 1;
}

/* UTF-8 of a str; lone surrogates (which no strict decoder gives, but a str may hold) are
 * encoded as their three bytes, the same way encode_cp() below writes them. */
static PyObject *utf8_bytes(PyObject *str)
{
    return PyUnicode_AsEncodedString(str, "utf-8", "surrogatepass");
}

/* ---------------------------------------------------------------- the Table object */

typedef struct {
    PyObject_HEAD
    KeySet weights;
    KeySet function_words;
    PyObject *keep; /* list: the names (and UTF-8 bytes of the non-ASCII ones), alive as long as the table */
    Py_ssize_t max_words, max_pairs, scan_chars, top;
} Table;

static void Table_dealloc(Table *self)
{
    keyset_free(&self->weights);
    keyset_free(&self->function_words);
    Py_XDECREF(self->keep);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int add_keys(Table *self, KeySet *set, PyObject *name, double weight)
{
    if (!PyUnicode_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "feature names must be str");
        return -1;
    }
    if (PyList_Append(self->keep, name) < 0)
        return -1;
    const char *key;
    Py_ssize_t len;
    if (PyUnicode_IS_ASCII(name)) { /* its characters are its UTF-8: no copy */
        key = (const char *)PyUnicode_DATA(name);
        len = PyUnicode_GET_LENGTH(name);
    } else {
        PyObject *raw = utf8_bytes(name);
        if (!raw)
            return -1;
        if (PyList_Append(self->keep, raw) < 0) {
            Py_DECREF(raw);
            return -1;
        }
        Py_DECREF(raw); /* kept alive by self->keep */
        key = PyBytes_AS_STRING(raw);
        len = PyBytes_GET_SIZE(raw);
    }
    keyset_add(set, fnv(FNV_OFFSET, key, len), key, len, weight, name);
    return 0;
}

static int Table_init(Table *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"weights", "function_words", "max_words", "max_pairs", "scan_chars", "top", NULL};
    PyObject *weights, *function_words;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!Onnnn", kwlist, &PyDict_Type, &weights, &function_words,
                                     &self->max_words, &self->max_pairs, &self->scan_chars, &self->top))
        return -1;
    if (self->keep) {
        PyErr_SetString(PyExc_RuntimeError, "Table is already built");
        return -1;
    }
    if (self->max_words < 0 || self->max_pairs < 0 || self->scan_chars < 0 || self->top < 0) {
        PyErr_SetString(PyExc_ValueError, "limits must not be negative");
        return -1;
    }
    PyObject *words = PySequence_List(function_words);
    if (!words)
        return -1;
    self->keep = PyList_New(0);
    if (!self->keep || keyset_init(&self->weights, PyDict_GET_SIZE(weights)) < 0 ||
        keyset_init(&self->function_words, PyList_GET_SIZE(words)) < 0) {
        Py_DECREF(words);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(words); i++) {
        if (add_keys(self, &self->function_words, PyList_GET_ITEM(words, i), 0.0) < 0) {
            Py_DECREF(words);
            return -1;
        }
    }
    Py_DECREF(words);
    PyObject *name, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(weights, &pos, &name, &value)) {
        double w = PyFloat_AsDouble(value);
        if (w == -1.0 && PyErr_Occurred())
            return -1;
        if (add_keys(self, &self->weights, name, w) < 0)
            return -1;
    }
    return 0;
}

/* A copy of `src` with room for `extra` more keys: the entries copied as they are (an inline
 * key re-pointed at its copy), the slots copied, or placed again when the room needs more. */
static int keyset_copy(KeySet *dst, const KeySet *src, Py_ssize_t extra)
{
    if (keyset_init(dst, src->n + extra) < 0)
        return -1;
    memcpy(dst->entries, src->entries, (size_t)src->n * sizeof(Entry));
    dst->n = src->n;
    for (Py_ssize_t i = 0; i < dst->n; i++) {
        Entry *e = &dst->entries[i];
        if (e->len <= INLINE_KEY)
            e->key = e->inline_key;
    }
    if (dst->mask == src->mask) {
        memcpy(dst->slots, src->slots, (dst->mask + 1) * sizeof(Slot));
        return 0;
    }
    for (Py_ssize_t at = 0; at < dst->n; at++) {
        uint64_t h = dst->entries[at].hash;
        size_t i = slot_of(h, dst->mask);
        while (dst->slots[i].at >= 0)
            i = (i + 1) & dst->mask;
        dst->slots[i].tag = (uint32_t)(h >> 32);
        dst->slots[i].at = (int32_t)at;
    }
    return 0;
}

/* Table.updated(changes): a new Table equal to Table(weights | changes) when this one is
 * Table(weights) -- the entries copied (one memcpy), each changed weight set, each new name
 * added -- in a fraction of a full build. Names cannot be removed (build a new Table). */
static PyObject *Table_updated(Table *self, PyObject *args)
{
    PyObject *changes;
    if (!PyArg_ParseTuple(args, "O!", &PyDict_Type, &changes))
        return NULL;
    if (!self->keep) {
        PyErr_SetString(PyExc_RuntimeError, "Table is not built");
        return NULL;
    }
    Table *t = (Table *)Py_TYPE(self)->tp_alloc(Py_TYPE(self), 0);
    if (!t)
        return NULL;
    t->max_words = self->max_words;
    t->max_pairs = self->max_pairs;
    t->scan_chars = self->scan_chars;
    t->top = self->top;
    t->keep = PyList_GetSlice(self->keep, 0, PY_SSIZE_T_MAX); /* the names the copied entries borrow */
    if (!t->keep || keyset_copy(&t->function_words, &self->function_words, 0) < 0 ||
        keyset_copy(&t->weights, &self->weights, PyDict_GET_SIZE(changes)) < 0) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        Py_DECREF(t);
        return NULL;
    }
    PyObject *name, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(changes, &pos, &name, &value)) {
        double w = PyFloat_AsDouble(value);
        if (w == -1.0 && PyErr_Occurred())
            goto fail;
        if (!PyUnicode_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "feature names must be str");
            goto fail;
        }
        PyObject *raw = PyUnicode_IS_ASCII(name) ? NULL : utf8_bytes(name);
        if (!PyUnicode_IS_ASCII(name) && !raw)
            goto fail;
        const char *key = raw ? PyBytes_AS_STRING(raw) : (const char *)PyUnicode_DATA(name);
        Py_ssize_t len = raw ? PyBytes_GET_SIZE(raw) : PyUnicode_GET_LENGTH(name);
        Entry *e = keyset_find(&t->weights, fnv(FNV_OFFSET, key, len), key, len);
        Py_XDECREF(raw);
        if (e)
            e->weight = w;
        else if (add_keys(t, &t->weights, name, w) < 0)
            goto fail;
    }
    return (PyObject *)t;
fail:
    Py_DECREF(t);
    return NULL;
}

/* ---------------------------------------------------------------- per-call scratch */

typedef struct {
    char *buf; /* UTF-8 of every feature of the message, back to back */
    Py_ssize_t used, size;
} Bytes;

static int bytes_reserve(Bytes *b, Py_ssize_t more)
{
    if (b->used + more <= b->size)
        return 0;
    Py_ssize_t size = b->size ? b->size : 16384;
    while (size < b->used + more)
        size *= 2;
    char *grown = PyMem_Realloc(b->buf, (size_t)size);
    if (!grown) {
        PyErr_NoMemory();
        return -1;
    }
    b->buf = grown;
    b->size = size;
    return 0;
}

/* One code point as UTF-8 (surrogates as three bytes, as "surrogatepass" does). Room for 4
 * bytes must have been reserved. */
static inline void encode_cp(Bytes *b, Py_UCS4 ch)
{
    unsigned char *p = (unsigned char *)b->buf + b->used;
    if (ch < 0x80) {
        p[0] = (unsigned char)ch;
        b->used += 1;
    } else if (ch < 0x800) {
        p[0] = (unsigned char)(0xc0 | (ch >> 6));
        p[1] = (unsigned char)(0x80 | (ch & 0x3f));
        b->used += 2;
    } else if (ch < 0x10000) {
        p[0] = (unsigned char)(0xe0 | (ch >> 12));
        p[1] = (unsigned char)(0x80 | ((ch >> 6) & 0x3f));
        p[2] = (unsigned char)(0x80 | (ch & 0x3f));
        b->used += 3;
    } else {
        p[0] = (unsigned char)(0xf0 | (ch >> 18));
        p[1] = (unsigned char)(0x80 | ((ch >> 12) & 0x3f));
        p[2] = (unsigned char)(0x80 | ((ch >> 6) & 0x3f));
        p[3] = (unsigned char)(0x80 | (ch & 0x3f));
        b->used += 4;
    }
}

typedef struct {
    Py_ssize_t start, len; /* in Bytes.buf */
    uint64_t hash; /* fnv() of those bytes */
} Span;

typedef struct {
    Bytes bytes;
    Span *tokens; /* in order, for the pairs */
    Py_ssize_t n_tokens;
    KeySet distinct; /* the body features, first appearance first; key points into bytes.buf */
    Py_ssize_t n_words;
} Body;

static void body_free(Body *body)
{
    PyMem_Free(body->bytes.buf);
    PyMem_Free(body->tokens);
    keyset_free(&body->distinct);
}

/* `[^\W_]` of Python's re for str patterns is exactly Py_UNICODE_ISALNUM; in ASCII that is
 * [0-9A-Za-z] (looked up in a table: the Unicode database calls cost more than the scan). */
static inline int is_alnum(Py_UCS4 ch)
{
    if (ch < 128)
        return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || (ch >= 'A' && ch <= 'Z');
    return Py_UNICODE_ISALNUM(ch);
}
static inline int is_alpha(Py_UCS4 ch)
{
    if (ch < 128)
        return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
    return Py_UNICODE_ISALPHA(ch);
}
static inline int is_decimal(Py_UCS4 ch)
{
    if (ch < 128)
        return ch >= '0' && ch <= '9';
    return Py_UNICODE_ISDECIMAL(ch);
}
/* \w of Python's re for str patterns */
static inline int is_word(Py_UCS4 ch) { return is_alnum(ch) || ch == '_'; }

/* Whether ch matches the ASCII letter `lower` under re.IGNORECASE for str patterns: its two
 * cases, and for i also U+0130 and U+0131, for s also U+017F (re's extra case pairs). */
static inline int ci_letter(Py_UCS4 ch, Py_UCS4 lower)
{
    if (ch == lower || ch == lower - 32)
        return 1;
    if (lower == 'i')
        return ch == 0x130 || ch == 0x131;
    if (lower == 's')
        return ch == 0x17f;
    return 0;
}

#define IS_WORD_CHAR(ch) is_alnum(ch)
/* the marks that may join two runs of letters and digits: ['.$€£-] */
#define IS_MARK(ch) ((ch) == '\'' || (ch) == '.' || (ch) == '$' || (ch) == 0x20ac || (ch) == 0xa3 || (ch) == '-')

/* One word (code points [start, end) of the text) becomes a token, unless it is a function
 * word: `w if w.isalpha() else _word_token(w)` for w not in FUNCTION_WORDS, where
 * _word_token(w) is "n:" + re.sub(r"\d", "9", w)[:12] when w has a digit, else w. */
static int add_word(const Table *t, Body *body, int kind, const void *data, Py_ssize_t start, Py_ssize_t end)
{
    Py_ssize_t n = end - start;
    if (bytes_reserve(&body->bytes, 4 * n + 8) < 0)
        return -1;
    Py_ssize_t at = body->bytes.used;
    int alpha = 1, digit = 0;
    for (Py_ssize_t i = start; i < end; i++) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, i);
        alpha = alpha && is_alpha(ch);
        digit = digit || is_decimal(ch);
        encode_cp(&body->bytes, ch);
    }
    Py_ssize_t len = body->bytes.used - at;
    uint64_t h = fnv(FNV_OFFSET, body->bytes.buf + at, len);
    if (keyset_find(&t->function_words, h, body->bytes.buf + at, len)) {
        body->bytes.used = at;
        return 0;
    }
    if (!alpha && digit) { /* the number's shape */
        body->bytes.used = at;
        body->bytes.buf[body->bytes.used++] = 'n';
        body->bytes.buf[body->bytes.used++] = ':';
        for (Py_ssize_t i = start; i < end && i < start + 12; i++) {
            Py_UCS4 ch = PyUnicode_READ(kind, data, i);
            encode_cp(&body->bytes, is_decimal(ch) ? (Py_UCS4)'9' : ch);
        }
        len = body->bytes.used - at;
        h = fnv(FNV_OFFSET, body->bytes.buf + at, len);
    }
    body->tokens[body->n_tokens].start = at;
    body->tokens[body->n_tokens].len = len;
    body->tokens[body->n_tokens].hash = h;
    body->n_tokens++;
    return 0;
}

/* _words(): the runs `[^\W_]+(?:['.$€£-][^\W_]+)*` of text[:scan_chars]; a run of 2 to 25
 * characters is a word, a longer one is cut as `[^\W_](?:[^\W_]|['.$€£-](?=[^\W_])){1,24}`
 * cuts it (25 characters at a time, a cut never starting on a mark, a last single character
 * dropped). At most max_words words. */
static int split_words(const Table *t, Body *body, PyObject *text)
{
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    if (n > t->scan_chars)
        n = t->scan_chars;
    Py_ssize_t i = 0;
    while (i < n && body->n_words < t->max_words) {
        if (!IS_WORD_CHAR(PyUnicode_READ(kind, data, i))) {
            i++;
            continue;
        }
        Py_ssize_t run = i;
        for (;;) {
            while (i < n && IS_WORD_CHAR(PyUnicode_READ(kind, data, i)))
                i++;
            if (i + 1 < n && IS_MARK(PyUnicode_READ(kind, data, i)) && IS_WORD_CHAR(PyUnicode_READ(kind, data, i + 1)))
                i++;
            else
                break;
        }
        Py_ssize_t run_end = i;
        if (run_end - run <= MAX_RUN_WORD) {
            if (run_end - run > 1) {
                body->n_words++;
                if (add_word(t, body, kind, data, run, run_end) < 0)
                    return -1;
            }
            continue;
        }
        Py_ssize_t p = run;
        while (p < run_end && body->n_words < t->max_words) {
            if (!IS_WORD_CHAR(PyUnicode_READ(kind, data, p))) {
                p++;
                continue;
            }
            Py_ssize_t cut = run_end - p < MAX_RUN_WORD ? run_end - p : MAX_RUN_WORD;
            if (cut < 2)
                break;
            body->n_words++;
            if (add_word(t, body, kind, data, p, p + cut) < 0)
                return -1;
            p += cut;
        }
    }
    return 0;
}

static void add_distinct(Body *body, uint64_t h, Py_ssize_t start, Py_ssize_t len)
{
    keyset_add(&body->distinct, h, body->bytes.buf + start, len, 0.0, NULL);
}

/* All the body features of a message: tokens, pairs of the first max_pairs + 1 tokens
 * (" ".join), then the extra tokens. Keys point into body->bytes.buf, which no longer grows. */
static int collect_body(const Table *t, Body *body, PyObject *text, PyObject *extra)
{
    memset(body, 0, sizeof(*body));
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "text must be str");
        return -1;
    }
    if (!PyList_Check(extra)) {
        PyErr_SetString(PyExc_TypeError, "extra must be a list of str");
        return -1;
    }
    body->tokens = PyMem_Malloc(((size_t)t->max_words + 1) * sizeof(Span));
    if (!body->tokens) {
        PyErr_NoMemory();
        return -1;
    }
    if (split_words(t, body, text) < 0)
        return -1;
    Py_ssize_t n_pairs = body->n_tokens < t->max_pairs + 1 ? body->n_tokens : t->max_pairs + 1;
    n_pairs = n_pairs > 0 ? n_pairs - 1 : 0;
    Py_ssize_t extra_bytes = 0, n_extra = PyList_GET_SIZE(extra);
    PyObject *extra_utf8 = PyList_New(n_extra);
    if (!extra_utf8)
        return -1;
    for (Py_ssize_t i = 0; i < n_extra; i++) {
        PyObject *item = PyList_GET_ITEM(extra, i);
        PyObject *raw = PyUnicode_Check(item) ? utf8_bytes(item) : NULL;
        if (!raw) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "extra must be a list of str");
            Py_DECREF(extra_utf8);
            return -1;
        }
        PyList_SET_ITEM(extra_utf8, i, raw);
        extra_bytes += PyBytes_GET_SIZE(raw);
    }
    Py_ssize_t pair_bytes = 0;
    for (Py_ssize_t i = 0; i < n_pairs; i++)
        pair_bytes += body->tokens[i].len + 1 + body->tokens[i + 1].len;
    if (bytes_reserve(&body->bytes, pair_bytes + extra_bytes) < 0 ||
        keyset_init(&body->distinct, body->n_tokens + n_pairs + n_extra) < 0) {
        Py_DECREF(extra_utf8);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t words_end = body->bytes.used;
    for (Py_ssize_t i = 0; i < n_pairs; i++) {
        Span a = body->tokens[i], b = body->tokens[i + 1];
        char *out = body->bytes.buf + body->bytes.used;
        memcpy(out, body->bytes.buf + a.start, (size_t)a.len);
        out[a.len] = ' ';
        memcpy(out + a.len + 1, body->bytes.buf + b.start, (size_t)b.len);
        body->bytes.used += a.len + 1 + b.len;
    }
    Py_ssize_t extra_start = body->bytes.used;
    for (Py_ssize_t i = 0; i < n_extra; i++) {
        PyObject *raw = PyList_GET_ITEM(extra_utf8, i);
        memcpy(body->bytes.buf + body->bytes.used, PyBytes_AS_STRING(raw), (size_t)PyBytes_GET_SIZE(raw));
        body->bytes.used += PyBytes_GET_SIZE(raw);
    }
    /* the buffer is final: add the keys in the Python order (tokens, pairs, extra) */
    for (Py_ssize_t i = 0; i < body->n_tokens; i++)
        add_distinct(body, body->tokens[i].hash, body->tokens[i].start, body->tokens[i].len);
    Py_ssize_t at = words_end;
    for (Py_ssize_t i = 0; i < n_pairs; i++) {
        Span b = body->tokens[i + 1];
        /* FNV runs byte by byte: the pair's hash goes on from its first token's */
        uint64_t h = fnv(fnv(body->tokens[i].hash, " ", 1), body->bytes.buf + b.start, b.len);
        Py_ssize_t len = body->tokens[i].len + 1 + b.len;
        add_distinct(body, h, at, len);
        at += len;
    }
    at = extra_start;
    for (Py_ssize_t i = 0; i < n_extra; i++) {
        Py_ssize_t len = PyBytes_GET_SIZE(PyList_GET_ITEM(extra_utf8, i));
        add_distinct(body, fnv(FNV_OFFSET, body->bytes.buf + at, len), at, len);
        at += len;
    }
    Py_DECREF(extra_utf8);
    return 0;
}

/* ---------------------------------------------------------------- scoring */

typedef struct {
    double value; /* weight * scale, what the reasons rank by */
    const Entry *entry;
} Ranked;

/* Python orders reasons by the tuple (value, name): str order is code point order, which is
 * the byte order of UTF-8. */
static int ranked_cmp(const Ranked *a, const Ranked *b)
{
    if (a->value != b->value)
        return a->value < b->value ? -1 : 1;
    Py_ssize_t n = a->entry->len < b->entry->len ? a->entry->len : b->entry->len;
    int c = memcmp(a->entry->key, b->entry->key, (size_t)n);
    if (c)
        return c;
    return a->entry->len < b->entry->len ? -1 : (a->entry->len > b->entry->len ? 1 : 0);
}

/* Keep the `top` best of a stream in `best` (sorted best first); `sign` 1 keeps the largest
 * (heapq.nlargest), -1 the smallest (heapq.nsmallest). */
static void keep_best(Ranked *best, Py_ssize_t *n, Py_ssize_t top, Ranked item, int sign)
{
    Py_ssize_t i = *n;
    if (i == top) {
        if (top == 0 || sign * ranked_cmp(&item, &best[top - 1]) <= 0)
            return;
        i = top - 1;
    } else {
        (*n)++;
    }
    while (i > 0 && sign * ranked_cmp(&item, &best[i - 1]) > 0) {
        best[i] = best[i - 1];
        i--;
    }
    best[i] = item;
}

static PyObject *ranked_list(const Ranked *best, Py_ssize_t n)
{
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *item = Py_BuildValue("(dO)", best[i].value, best[i].entry->name);
        if (!item) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

/* The body of the message in (lowered_text, extra); on failure nothing is left to free. */
static int body_from_args(const Table *self, PyObject *args, Body *body)
{
    PyObject *text, *extra;
    memset(body, 0, sizeof(*body));
    if (!PyArg_ParseTuple(args, "UO!", &text, &PyList_Type, &extra))
        return -1;
    if (collect_body(self, body, text, extra) < 0) {
        body_free(body);
        return -1;
    }
    return 0;
}

/* _weigh() for the body block (scale = 1 / sqrt(known + 1), sum of the known weights) and
 * _top_reasons()' candidates from it: the `top` strongest toward spam and toward ham. */
static PyObject *Table_score_body(Table *self, PyObject *args)
{
    Body body;
    if (body_from_args(self, args, &body) < 0)
        return NULL;
    const Entry **found = PyMem_Malloc(((size_t)body.distinct.n + 1) * sizeof(Entry *));
    Ranked *spam = PyMem_Malloc(((size_t)self->top + 1) * sizeof(Ranked));
    Ranked *ham = PyMem_Malloc(((size_t)self->top + 1) * sizeof(Ranked));
    if (!found || !spam || !ham) {
        PyMem_Free(found);
        PyMem_Free(spam);
        PyMem_Free(ham);
        body_free(&body);
        return PyErr_NoMemory();
    }
    Py_ssize_t known = 0;
    double total = 0.0;
    const KeySet *weights = &self->weights;
    const Entry *features = body.distinct.entries;
    for (Py_ssize_t i = 0; i < body.distinct.n; i++) {
        /* The table is megabytes: fetch the slot a few features ahead, and the entry of
         * the slot fetched before, so the misses overlap instead of following each other. */
        if (i + 2 * PREFETCH_AHEAD < body.distinct.n)
            __builtin_prefetch(&weights->slots[slot_of(features[i + 2 * PREFETCH_AHEAD].hash, weights->mask)]);
        if (i + PREFETCH_AHEAD < body.distinct.n) {
            Slot ahead = weights->slots[slot_of(features[i + PREFETCH_AHEAD].hash, weights->mask)];
            if (ahead.at >= 0)
                __builtin_prefetch(&weights->entries[ahead.at]);
        }
        const Entry *feature = &features[i];
        const Entry *e = keyset_find(weights, feature->hash, feature->key, feature->len);
        if (e) {
            found[known++] = e;
            if (e->weight != 0.0) /* sum(filter(None, found)) */
                total += e->weight;
        }
    }
    double scale = 1.0 / sqrt((double)(known + 1));
    Py_ssize_t n_spam = 0, n_ham = 0;
    for (Py_ssize_t i = 0; i < known; i++) {
        Ranked item = {found[i]->weight * scale, found[i]};
        if (found[i]->weight > 0.0)
            keep_best(spam, &n_spam, self->top, item, 1);
        else if (found[i]->weight < 0.0)
            keep_best(ham, &n_ham, self->top, item, -1);
    }
    PyObject *spam_list = ranked_list(spam, n_spam);
    PyObject *ham_list = spam_list ? ranked_list(ham, n_ham) : NULL;
    PyObject *result = NULL;
    if (spam_list && ham_list)
        result = Py_BuildValue("(ndnOO)", body.n_words, total, known, spam_list, ham_list);
    Py_XDECREF(spam_list);
    Py_XDECREF(ham_list);
    PyMem_Free(found);
    PyMem_Free(spam);
    PyMem_Free(ham);
    body_free(&body);
    return result;
}

static PyObject *Table_body_features(Table *self, PyObject *args)
{
    Body body;
    if (body_from_args(self, args, &body) < 0)
        return NULL;
    PyObject *out = PyList_New(body.distinct.n);
    for (Py_ssize_t i = 0; out && i < body.distinct.n; i++) {
        const Entry *e = &body.distinct.entries[i];
        PyObject *s = PyUnicode_DecodeUTF8(e->key, e->len, "surrogatepass");
        if (!s) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, s);
    }
    PyObject *result = out ? Py_BuildValue("(nO)", body.n_words, out) : NULL;
    Py_XDECREF(out);
    body_free(&body);
    return result;
}

static PyObject *Table_len(Table *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(self->weights.n);
}

/* _style_counts(): over text[:scan_chars], the counts _body_style() weighs --
 * len(re.findall(r"[A-Z](?<!\w[A-Z])[A-Z]+(?!\w)")): runs of two or more ASCII capitals
 *     with no \w (Py_UNICODE_ISALNUM or "_") either side;
 * text.count("!");
 * len(re.findall(r"[$€£]\s?\d")): a currency sign, one optional white space, a decimal digit;
 * text.count("%"). */
static PyObject *style_counts(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *text;
    Py_ssize_t scan_chars;
    if (!PyArg_ParseTuple(args, "Un", &text, &scan_chars))
        return NULL;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    if (n > scan_chars)
        n = scan_chars > 0 ? scan_chars : 0;
    Py_ssize_t caps = 0, exclaims = 0, amounts = 0, percentages = 0;
    int prev_word = 0; /* is text[i - 1] a \w character */
    for (Py_ssize_t i = 0; i < n;) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, i);
        if (ch >= 'A' && ch <= 'Z') {
            Py_ssize_t j = i + 1;
            while (j < n) {
                Py_UCS4 c = PyUnicode_READ(kind, data, j);
                if (c < 'A' || c > 'Z')
                    break;
                j++;
            }
            if (!prev_word && j - i >= 2) {
                Py_UCS4 after = j < n ? PyUnicode_READ(kind, data, j) : 0;
                if (j == n || !is_word(after))
                    caps++;
            }
            prev_word = 1;
            i = j;
            continue;
        }
        if (ch == '!')
            exclaims++;
        else if (ch == '%')
            percentages++;
        else if (ch == '$' || ch == 0x20ac || ch == 0xa3) {
            if (i + 1 < n) {
                Py_UCS4 next = PyUnicode_READ(kind, data, i + 1);
                if (is_decimal(next) ||
                    (Py_UNICODE_ISSPACE(next) && i + 2 < n && is_decimal(PyUnicode_READ(kind, data, i + 2))))
                    amounts++;
            }
        }
        prev_word = is_word(ch);
        i++;
    }
    return Py_BuildValue("(nnnn)", caps, exclaims, amounts, percentages);
}

/* ---------------------------------------------------------------- the header block */

static PyObject *NEWLINE; /* "\n", joins a value's lines */

/* The header read so far (`name` and the lines of its value) joined and appended as a tuple. */
static int add_header(PyObject *headers, PyObject **name, PyObject **lines)
{
    PyObject *value = PyUnicode_Join(NEWLINE, *lines);
    PyObject *pair = value ? PyTuple_Pack(2, *name, value) : NULL;
    int rc = pair ? PyList_Append(headers, pair) : -1;
    Py_XDECREF(value);
    Py_XDECREF(pair);
    Py_CLEAR(*name);
    Py_CLEAR(*lines);
    return rc;
}

/* message._split_headers_reference(): the (name, value) pairs of a header block as compat32
 * stores them, or None when a line is neither `name:` (name: printable ASCII but ":") nor a
 * continuation (a space or tab first, after a header). A value loses the blanks after the
 * colon; each of its lines loses its trailing "\r"s; continuation lines join with "\n". */
static PyObject *split_headers(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *head;
    if (!PyArg_ParseTuple(args, "U", &head))
        return NULL;
    int kind = PyUnicode_KIND(head);
    const void *data = PyUnicode_DATA(head);
    Py_ssize_t n = PyUnicode_GET_LENGTH(head);
    PyObject *headers = PyList_New(0);
    PyObject *name = NULL, *lines = NULL;
    if (!headers)
        return NULL;
    for (Py_ssize_t start = 0; start <= n;) { /* head.split("\n") */
        Py_ssize_t end = start;
        while (end < n && PyUnicode_READ(kind, data, end) != '\n')
            end++;
        Py_UCS4 first = start < end ? PyUnicode_READ(kind, data, start) : 0;
        Py_ssize_t from;
        if (first == ' ' || first == '\t') {
            if (!name)
                goto not_simple;
            from = start;
        } else {
            Py_ssize_t colon = start;
            while (colon < end) {
                Py_UCS4 ch = PyUnicode_READ(kind, data, colon);
                if (ch < 0x21 || ch > 0x7e || ch == ':')
                    break;
                colon++;
            }
            if (colon == start || colon == end || PyUnicode_READ(kind, data, colon) != ':')
                goto not_simple;
            if (name && add_header(headers, &name, &lines) < 0)
                goto error;
            name = PyUnicode_Substring(head, start, colon);
            lines = PyList_New(0);
            if (!name || !lines)
                goto error;
            from = colon + 1;
            while (from < end && (PyUnicode_READ(kind, data, from) == ' ' || PyUnicode_READ(kind, data, from) == '\t'))
                from++;
        }
        Py_ssize_t to = end;
        while (to > from && PyUnicode_READ(kind, data, to - 1) == '\r')
            to--;
        PyObject *line = PyUnicode_Substring(head, from, to);
        if (!line || PyList_Append(lines, line) < 0) {
            Py_XDECREF(line);
            goto error;
        }
        Py_DECREF(line);
        start = end + 1;
    }
    if (name && add_header(headers, &name, &lines) < 0)
        goto error;
    return headers;
not_simple:
    Py_XDECREF(name);
    Py_XDECREF(lines);
    Py_DECREF(headers);
    Py_RETURN_NONE;
error:
    Py_XDECREF(name);
    Py_XDECREF(lines);
    Py_DECREF(headers);
    return NULL;
}

/* ---------------------------------------------------------------- URLs in text */

/* [^\s"'<>()\[\]{}\\^`|] of Python's re for str patterns (\s is Py_UNICODE_ISSPACE) */
static inline int is_url_char(Py_UCS4 ch)
{
    if (ch >= 128)
        return !Py_UNICODE_ISSPACE(ch);
    if (ch <= ' ')
        return !((ch >= 9 && ch <= 13) || (ch >= 28 && ch <= 32));
    return !strchr("\"'<>()[]{}\\^`|", (int)ch);
}

/* message._URL_RE.findall(text):
 *   [hHwW](?<!\w[hHwW])(?:(?<=[hH])(?i:ttps?://)|(?<=[wW])(?i:ww\.))[^\s"'<>()\[\]{}\\^`|]{2,300}
 * an h or w with no \w before it, "ttp" "s"? "://" after an h or "ww." after a w, then 2 to
 * 300 URL characters (greedy); the search goes on after a match, or one character further. */
static PyObject *find_urls(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *text;
    if (!PyArg_ParseTuple(args, "U", &text))
        return NULL;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    PyObject *urls = PyList_New(0);
    if (!urls)
        return NULL;
#define AT(k) ((k) < n ? PyUnicode_READ(kind, data, (k)) : 0)
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, i);
        int h = ci_letter(ch, 'h'), w = ci_letter(ch, 'w');
        if (!h && !w)
            continue;
        if (i > 0) {
            Py_UCS4 before = PyUnicode_READ(kind, data, i - 1);
            if (is_word(before))
                continue;
        }
        Py_ssize_t j = i + 1;
        if (h) {
            if (!(ci_letter(AT(j), 't') && ci_letter(AT(j + 1), 't') && ci_letter(AT(j + 2), 'p')))
                continue;
            j += 3;
            if (ci_letter(AT(j), 's'))
                j++;
            if (!(AT(j) == ':' && AT(j + 1) == '/' && AT(j + 2) == '/'))
                continue;
            j += 3;
        } else {
            if (!(ci_letter(AT(j), 'w') && ci_letter(AT(j + 1), 'w') && AT(j + 2) == '.'))
                continue;
            j += 3;
        }
        Py_ssize_t end = j;
        while (end < n && end - j < 300 && is_url_char(PyUnicode_READ(kind, data, end)))
            end++;
        if (end - j < 2)
            continue;
        PyObject *url = PyUnicode_Substring(text, i, end);
        if (!url || PyList_Append(urls, url) < 0) {
            Py_XDECREF(url);
            Py_DECREF(urls);
            return NULL;
        }
        Py_DECREF(url);
        i = end - 1; /* the loop's i++ resumes the search at the match's end */
    }
#undef AT
    return urls;
}

/* ---------------------------------------------------------------- HTML to text */

typedef struct {
    Py_UCS4 *at;
    Py_ssize_t n, size;
} Ucs4;

static int ucs4_put(Ucs4 *out, const Py_UCS4 *from, Py_ssize_t n)
{
    if (n == 0)
        return 0;
    if (out->n + n > out->size) {
        Py_ssize_t size = out->size ? out->size : 4096;
        while (size < out->n + n)
            size *= 2;
        Py_UCS4 *grown = PyMem_Realloc(out->at, (size_t)size * sizeof(Py_UCS4));
        if (!grown) {
            PyErr_NoMemory();
            return -1;
        }
        out->at = grown;
        out->size = size;
    }
    memcpy(out->at + out->n, from, (size_t)n * sizeof(Py_UCS4));
    out->n += n;
    return 0;
}

static const Py_UCS4 SPACE = ' ';

/* s[at:] starts with `word` under re.IGNORECASE */
static int ci_word(const Py_UCS4 *s, Py_ssize_t n, Py_ssize_t at, const char *word)
{
    for (Py_ssize_t k = 0; word[k]; k++)
        if (at + k >= n || !ci_letter(s[at + k], (Py_UCS4)word[k]))
            return 0;
    return 1;
}

/* A closer looked for: "-->" (len 0) or "</" + a name, lowered, + \s* + ">"; and where the
 * last search for it started, where it found it (-1: nowhere) and where that match ended. A
 * closer found after one start is the first after every later start up to it, and none
 * found means none after any later start: so each closer's searches take linear time in
 * all, where re's lazy .*? scans to the end again for every unclosed opener. */
typedef struct {
    Py_UCS4 name[6];
    Py_ssize_t len, from, found, end;
} Closer;

#define MAX_CLOSERS 9 /* "-->", and the lowered spellings of script (4) and style (2) */

static Py_ssize_t find_closer(const Py_UCS4 *s, Py_ssize_t n, const Closer *c, Py_ssize_t start, Py_ssize_t *end)
{
    for (Py_ssize_t j = start; j + 1 < n; j++) {
        if (c->len == 0) {
            if (s[j] == '-' && j + 2 < n && s[j + 1] == '-' && s[j + 2] == '>') {
                *end = j + 3;
                return j;
            }
            continue;
        }
        if (s[j] != '<' || s[j + 1] != '/' || j + 2 + c->len > n)
            continue;
        Py_ssize_t k = 0;
        while (k < c->len && Py_UNICODE_TOLOWER(s[j + 2 + k]) == c->name[k])
            k++;
        if (k < c->len)
            continue;
        Py_ssize_t e = j + 2 + c->len;
        while (e < n && Py_UNICODE_ISSPACE(s[e]))
            e++;
        if (e < n && s[e] == '>') {
            *end = e + 1;
            return j;
        }
    }
    return -1;
}

/* The end of the closer's first match at or after `start`, or -1 (see Closer). */
static Py_ssize_t closer_end(const Py_UCS4 *s, Py_ssize_t n, Closer *c, Py_ssize_t start)
{
    if (!(c->from >= 0 && start >= c->from && (c->found < 0 || start <= c->found))) {
        c->found = find_closer(s, n, c, start, &c->end);
        c->from = start;
    }
    return c->found < 0 ? -1 : c->end;
}

/* The end of a match of (?is)<(script|style)\b.*?</\1\s*>|<!--.*?--> at s[at] (a '<'), or -1:
 * the first closing tag whose name equals the opening one's letter for letter after
 * Py_UNICODE_TOLOWER (how re compares a backreference under IGNORECASE). `closers` holds
 * the searches so far (closers[0] is "-->"). */
static Py_ssize_t script_style_end(const Py_UCS4 *s, Py_ssize_t n, Py_ssize_t at, Closer *closers, int *n_closers)
{
    Py_ssize_t name_len = 0;
    if (ci_word(s, n, at + 1, "script"))
        name_len = 6;
    else if (ci_word(s, n, at + 1, "style"))
        name_len = 5;
    if (name_len && !(at + 1 + name_len < n && is_word(s[at + 1 + name_len]))) {
        Closer wanted = {{0}, name_len, -1, -1, -1};
        for (Py_ssize_t k = 0; k < name_len; k++)
            wanted.name[k] = Py_UNICODE_TOLOWER(s[at + 1 + k]);
        Closer *c = NULL;
        for (int i = 1; i < *n_closers && !c; i++)
            if (closers[i].len == name_len && !memcmp(closers[i].name, wanted.name, sizeof wanted.name))
                c = &closers[i];
        if (!c && *n_closers < MAX_CLOSERS) {
            c = &closers[(*n_closers)++];
            *c = wanted;
        }
        return closer_end(s, n, c ? c : &wanted, at + 1 + name_len);
    }
    if (at + 3 < n && s[at + 1] == '!' && s[at + 2] == '-' && s[at + 3] == '-')
        return closer_end(s, n, &closers[0], at + 4);
    return -1;
}

/* _HREF_RE's group at s[at], or -1 (*start set to where the group begins):
 *   [hHsSſ](?<!\w[hHsSſ])(?:(?<=[hH])(?i:ref)|(?<=[sSſ])(?i:rc))\s*=\s*["']?\s*([^"'\s>]{1,300}) */
static Py_ssize_t href_end(const Py_UCS4 *s, Py_ssize_t n, Py_ssize_t at, Py_ssize_t *start)
{
    Py_UCS4 ch = s[at];
    Py_ssize_t j;
    if (ch == 'h' || ch == 'H')
        j = ci_word(s, n, at + 1, "ref") ? at + 4 : -1;
    else if (ch == 's' || ch == 'S' || ch == 0x17f)
        j = ci_word(s, n, at + 1, "rc") ? at + 3 : -1;
    else
        return -1;
    if (j < 0 || (at > 0 && is_word(s[at - 1])))
        return -1;
    while (j < n && Py_UNICODE_ISSPACE(s[j]))
        j++;
    if (j >= n || s[j] != '=')
        return -1;
    j++;
    while (j < n && Py_UNICODE_ISSPACE(s[j]))
        j++;
    if (j < n && (s[j] == '"' || s[j] == '\''))
        j++;
    while (j < n && Py_UNICODE_ISSPACE(s[j]))
        j++;
    Py_ssize_t end = j;
    while (end < n && end - j < 300 && s[end] != '"' && s[end] != '\'' && s[end] != '>' && !Py_UNICODE_ISSPACE(s[end]))
        end++;
    *start = j;
    return end > j ? end : -1;
}

/* message.html_to_text() before html.unescape():
 *   links = _HREF_RE.findall(markup); images = len(_IMG_RE.findall(markup))  ((?i)<img\b)
 *   text = _TAG_RE.sub(" ", _SCRIPT_STYLE_RE.sub(" ", markup))                ((?s)<[^>]{0,4000}>)
 * -> (text, links, images) */
static PyObject *html_parts(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *markup;
    if (!PyArg_ParseTuple(args, "U", &markup))
        return NULL;
    Py_ssize_t n = PyUnicode_GET_LENGTH(markup);
    Py_UCS4 *s = PyUnicode_AsUCS4Copy(markup);
    if (!s)
        return NULL;
    PyObject *links = PyList_New(0), *result = NULL;
    Ucs4 pass = {0}, text = {0};
    Py_ssize_t images = 0;
    if (!links)
        goto done;
    /* the two findall scans at once: a link's group may hold an <img, which still counts */
    for (Py_ssize_t i = 0, links_from = 0; i < n; i++) {
        Py_ssize_t start, end;
        if (s[i] == '<') {
            if (ci_word(s, n, i + 1, "img") && !(i + 4 < n && is_word(s[i + 4])))
                images++;
        } else if (i >= links_from && (end = href_end(s, n, i, &start)) >= 0) {
            PyObject *link = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, s + start, end - start);
            if (!link || PyList_Append(links, link) < 0) {
                Py_XDECREF(link);
                goto done;
            }
            Py_DECREF(link);
            links_from = end;
        }
    }
    Closer closers[MAX_CLOSERS] = {{{0}, 0, -1, -1, -1}}; /* [0]: "-->" */
    int n_closers = 1;
    Py_ssize_t copied = 0; /* pass 1: scripts, styles and comments become one space */
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t end;
        if (s[i] == '<' && (end = script_style_end(s, n, i, closers, &n_closers)) >= 0) {
            if (ucs4_put(&pass, s + copied, i - copied) < 0 || ucs4_put(&pass, &SPACE, 1) < 0)
                goto done;
            copied = end;
            i = end - 1;
        }
    }
    if (ucs4_put(&pass, s + copied, n - copied) < 0)
        goto done;
    copied = 0; /* pass 2: tags become one space; a '<' starts one when the next '>' is at
                 * most 4000 characters on (found once per '>', not per '<') */
    for (Py_ssize_t i = 0, close = -1; i < pass.n; i++) {
        if (pass.at[i] != '<')
            continue;
        if (close <= i) {
            close = i + 1;
            while (close < pass.n && pass.at[close] != '>')
                close++;
            if (close == pass.n)
                break; /* no '>' after this '<', nor after any later one */
        }
        if (close - i - 1 <= 4000) {
            if (ucs4_put(&text, pass.at + copied, i - copied) < 0 || ucs4_put(&text, &SPACE, 1) < 0)
                goto done;
            copied = close + 1;
            i = close;
        }
    }
    if (ucs4_put(&text, pass.at + copied, pass.n - copied) < 0)
        goto done;
    PyObject *out = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, text.at ? text.at : s, text.n);
    if (out) {
        result = Py_BuildValue("(NOn)", out, links, images);
    }
done:
    Py_XDECREF(links);
    PyMem_Free(s);
    PyMem_Free(pass.at);
    PyMem_Free(text.at);
    return result;
}

/* ---------------------------------------------------------------- milter packets */

/* split_commands(buf, max_packet, prefixes) is adapters/milter/wire.split_commands_reference()
 * compiled: the whole milter packets waiting in a connection's buffer, up to and including
 * an end of message or quit, as (cmd, data) pairs -- except that a run of header packets
 * ('L', each with exactly two NUL-terminated strings) and the end-of-header-stage macro
 * packets Postfix sends before each of them ('D' whose first byte is 'L') comes as one item:
 * (b"*", the run's packets, the headers as "Name: value\r\n" lines with every LF a CRLF,
 * the names starting with one of `prefixes` (ASCII, lowercase; compared case-insensitively),
 * the last macro packet's strings or None). Returns (bytes consumed, items, bad length or -1). */

static int is_header_packet(char cmd, const unsigned char *data, Py_ssize_t n)
{
    if (cmd == 'D')
        return n >= 1 && data[0] == 'L';
    if (cmd != 'L')
        return 0;
    Py_ssize_t nuls = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        nuls += data[i] == 0;
    return nuls == 2;
}

static int has_prefix_ci(const unsigned char *name, Py_ssize_t n, PyObject *prefixes)
{
    Py_ssize_t count = PyTuple_GET_SIZE(prefixes);
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *prefix = PyTuple_GET_ITEM(prefixes, k);
        Py_ssize_t len = PyBytes_GET_SIZE(prefix);
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(prefix);
        if (len > n)
            continue;
        Py_ssize_t i = 0;
        while (i < len) {
            unsigned char c = name[i];
            if (c >= 'A' && c <= 'Z')
                c += 'a' - 'A';
            if (c != p[i])
                break;
            i++;
        }
        if (i == len)
            return 1;
    }
    return 0;
}

/* Appends "name: value\r\n" to out (value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")). */
static int append_header(Bytes *out, const unsigned char *data, Py_ssize_t name_len, Py_ssize_t value_len)
{
    const unsigned char *value = data + name_len + 1;
    if (bytes_reserve(out, name_len + 4 + 2 * value_len) < 0)
        return -1;
    memcpy(out->buf + out->used, data, name_len);
    out->used += name_len;
    out->buf[out->used++] = ':';
    out->buf[out->used++] = ' ';
    for (Py_ssize_t i = 0; i < value_len; i++) {
        unsigned char c = value[i];
        if (c == '\r' && i + 1 < value_len && value[i + 1] == '\n')
            continue; /* "\r\n" -> "\n", which the next step makes "\r\n" again */
        if (c == '\n')
            out->buf[out->used++] = '\r';
        out->buf[out->used++] = (char)c;
    }
    out->buf[out->used++] = '\r';
    out->buf[out->used++] = '\n';
    return 0;
}

static PyObject *header_run_item(const char *buf, Py_ssize_t start, Py_ssize_t end, Bytes *block, PyObject *forged,
                                 const unsigned char *macros, Py_ssize_t macros_len)
{
    PyObject *none_or_macros = macros ? PyBytes_FromStringAndSize((const char *)macros, macros_len) : Py_NewRef(Py_None);
    if (!none_or_macros)
        return NULL;
    return Py_BuildValue("(y#y#y#ON)", "*", (Py_ssize_t)1, buf + start, end - start, block->used ? block->buf : "", block->used,
                         forged, none_or_macros);
}

static PyObject *split_commands(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t max_packet;
    PyObject *prefixes;
    if (!PyArg_ParseTuple(args, "y*nO!", &view, &max_packet, &PyTuple_Type, &prefixes))
        return NULL;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(prefixes); k++)
        if (!PyBytes_Check(PyTuple_GET_ITEM(prefixes, k))) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_TypeError, "prefixes must be bytes");
            return NULL;
        }
    const char *buf = view.buf;
    Py_ssize_t n = view.len, pos = 0, bad = -1;
    Py_ssize_t run_start = -1;
    const unsigned char *macros = NULL;
    Py_ssize_t macros_len = 0;
    Bytes block = {0};
    PyObject *items = PyList_New(0), *forged = NULL, *item = NULL;
    if (!items)
        goto fail;
    while (n - pos >= 4) {
        const unsigned char *head = (const unsigned char *)buf + pos;
        uint32_t length = ((uint32_t)head[0] << 24) | ((uint32_t)head[1] << 16) | ((uint32_t)head[2] << 8) | head[3];
        if (length < 1 || (Py_ssize_t)length > max_packet) {
            bad = (Py_ssize_t)length;
            break;
        }
        if (n - pos - 4 < (Py_ssize_t)length)
            break;
        char cmd = (char)head[4];
        const unsigned char *data = head + 5;
        Py_ssize_t data_len = (Py_ssize_t)length - 1;
        if (is_header_packet(cmd, data, data_len)) {
            if (run_start < 0) {
                run_start = pos;
                block.used = 0;
                macros = NULL;
                if (!(forged = PyList_New(0)))
                    goto fail;
            }
            if (cmd == 'D') {
                macros = data + 1;
                macros_len = data_len - 1;
            } else {
                Py_ssize_t name_len = (Py_ssize_t)strlen((const char *)data);
                Py_ssize_t value_len = (Py_ssize_t)strlen((const char *)data + name_len + 1);
                if (append_header(&block, data, name_len, value_len) < 0)
                    goto fail;
                if (has_prefix_ci(data, name_len, prefixes)) {
                    PyObject *name = PyBytes_FromStringAndSize((const char *)data, name_len);
                    if (!name || PyList_Append(forged, name) < 0) {
                        Py_XDECREF(name);
                        goto fail;
                    }
                    Py_DECREF(name);
                }
            }
        } else {
            if (run_start >= 0) {
                item = header_run_item(buf, run_start, pos, &block, forged, macros, macros_len);
                Py_CLEAR(forged);
                run_start = -1;
                if (!item || PyList_Append(items, item) < 0)
                    goto fail;
                Py_CLEAR(item);
            }
            if (!(item = Py_BuildValue("(y#y#)", &cmd, (Py_ssize_t)1, (const char *)data, data_len))
                || PyList_Append(items, item) < 0)
                goto fail;
            Py_CLEAR(item);
        }
        pos += 4 + (Py_ssize_t)length;
        if (cmd == 'E' || cmd == 'Q')
            break;
    }
    if (run_start >= 0 && bad < 0) {
        item = header_run_item(buf, run_start, pos, &block, forged, macros, macros_len);
        if (!item || PyList_Append(items, item) < 0)
            goto fail;
        Py_CLEAR(item);
    }
    Py_XDECREF(forged);
    PyMem_Free(block.buf);
    PyBuffer_Release(&view);
    return Py_BuildValue("(nNn)", pos, items, bad);
fail:
    Py_XDECREF(item);
    Py_XDECREF(forged);
    Py_XDECREF(items);
    PyMem_Free(block.buf);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"split_headers", split_headers, METH_VARARGS,
     "split_headers(head) -> [(name, value), ...] as compat32 stores them, or None when the block is not simple"},
    {"find_urls", find_urls, METH_VARARGS, "find_urls(text) -> message._URL_RE.findall(text)"},
    {"html_parts", html_parts, METH_VARARGS,
     "html_parts(markup) -> (text with tags, scripts, styles and comments as spaces, links, <img> count)"},
    {"style_counts", style_counts, METH_VARARGS,
     "style_counts(text, scan_chars) -> (shouted words, '!', money amounts, '%') in text[:scan_chars]"},
    {"split_commands", split_commands, METH_VARARGS,
     "split_commands(buf, max_packet, prefixes) -> (consumed, [(cmd, data) or (b'*', run, header block, forged names, macros)], bad length or -1)"},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef Table_methods[] = {
    {"score_body", (PyCFunction)Table_score_body, METH_VARARGS,
     "score_body(lowered_text, extra) -> (n_words, weight_sum, n_known, strongest_spam, strongest_ham)"},
    {"body_features", (PyCFunction)Table_body_features, METH_VARARGS,
     "body_features(lowered_text, extra) -> (n_words, distinct body features in order of appearance)"},
    {"size", (PyCFunction)Table_len, METH_NOARGS, "number of weights in the table"},
    {"updated", (PyCFunction)Table_updated, METH_VARARGS,
     "updated(changes: dict[str, float]) -> a new Table with these weights set (names added if new)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "atlas_milter._hotpath.Table",
    .tp_doc = "The model's weights as a hash table of UTF-8 keys, and the body block scored against it.",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Table_init,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_methods = Table_methods,
};

static struct PyModuleDef hotpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "atlas_milter._hotpath",
    .m_doc = "The hot path compiled: header split (message.py), body block (classifier.py) and milter packet framing (adapters/milter/wire.py) -- the Python code is the reference.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__hotpath(void)
{
    if (PyType_Ready(&TableType) < 0)
        return NULL;
    if (!NEWLINE && !(NEWLINE = PyUnicode_FromString("\n")))
        return NULL;
    PyObject *module = PyModule_Create(&hotpath_module);
    if (!module)
        return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(module, "Table", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
