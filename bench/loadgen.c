/*
 * loadgen.c - SOCKS5 load generator and benchmark targets for socksflow.
 *
 * Build:  gcc -O2 -pthread -o loadgen loadgen.c
 *
 * One binary, several subcommands:
 *
 *   loadgen target   [-t THREADS] [-d MAX_LIFETIME_SECS (default 1800)]
 *       Starts the benchmark targets on 127.0.0.1 (ephemeral ports) and
 *       prints one line:  TARGET echo=P keep=P bulk=P udp=P
 *         echo : TCP echo that closes right after it has echoed 64 bytes
 *                (the target closes first, so TIME_WAIT lands on the
 *                target side, not on the load generator's ports)
 *         keep : TCP echo that never closes first (idle tunnels, rr)
 *         bulk : reads a 16-byte request {u64 count, u64 start} (LE) and
 *                sends `count` bytes of the pattern  b[i] = (start+i) % 251,
 *                then closes
 *         udp  : UDP echo
 *       Exits when stdin reaches EOF (so it dies with its parent), on
 *       SIGTERM/SIGINT, or after -d seconds at the latest.
 *
 *   loadgen sessions -p PROXY -T TARGET [-n 100] [-d 5] [-t 1] [--rst]
 *   loadgen bulk     -p PROXY -T TARGET [-S 1] [-B 1073741824] [-d 20] [-t 1]
 *   loadgen idle     -p PROXY -T TARGET [-k 2000] [-c 64] [--hold 120]
 *   loadgen rr       -p PROXY -T TARGET [-d 3] [-N 1000000] [--spin]
 *   loadgen udp      -p PROXY -T TARGET [-d 3] [-w 64] [-s 64]
 *
 *   PROXY is host:port of a SOCKS5 server (IPv4 literal), or "none" to talk
 *   to the target directly (the "no proxy" limit row).  TARGET is the
 *   IPv4 host:port of the target, sent in the SOCKS5 CONNECT (ATYP 1) /
 *   UDP header.  Each scenario prints one machine-readable line:
 *       RESULT <scenario> key=value ...
 *   Diagnostics go to stderr.
 *
 * Everything is epoll/non-blocking except rr (one connection: blocking
 * write, then blocking recv or, with --spin, a busy-polling MSG_DONTWAIT
 * recv) and the SOCKS control connection of udp.
 * Every loop is bounded by a deadline.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define PAT_PERIOD 251u
#define CHUNK (256u * 1024u)
#define MAXEV 256

static uint8_t g_pat[CHUNK + 512];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void init_pattern(void)
{
    for (size_t i = 0; i < sizeof g_pat; i++)
        g_pat[i] = (uint8_t)(i % PAT_PERIOD);
}

static int parse_hostport(const char *s, struct sockaddr_in *out)
{
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host)
        return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    if (inet_pton(AF_INET, host, &out->sin_addr) != 1)
        return -1;
    long p = strtol(colon + 1, NULL, 10);
    if (p <= 0 || p > 65535)
        return -1;
    out->sin_port = htons((uint16_t)p);
    /* Network rule of this harness: loopback only. */
    if ((ntohl(out->sin_addr.s_addr) >> 24) != 127)
        die("refusing non-loopback address %s", s);
    return 0;
}

static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void set_linger0(int fd)
{
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
}

/* ------------------------------------------------------------------ */
/* Options shared by the client scenarios                              */
/* ------------------------------------------------------------------ */
static struct sockaddr_in g_proxy, g_target;
static int g_noproxy;
static int g_http;              /* speak HTTP CONNECT to the proxy instead of SOCKS5 */
static int g_n = 100;            /* sessions: in flight */
static double g_dur = 5.0;       /* seconds */
static int g_threads = 1;
static int g_rst;                /* sessions: close with RST instead of waiting for EOF */
static double g_timeout = 5.0;   /* per-session/handshake timeout */
static int g_streams = 1;
static uint64_t g_bytes = 1ull << 30;
static int g_k = 2000;
static int g_conc = 64;
static double g_hold = 120.0;
static long g_rounds = 1000000;
static int g_window = 64;
static int g_size = 64;
static int g_spin;              /* rr: busy-poll instead of blocking recv */

static int build_connect_req(uint8_t *b, uint8_t cmd, const struct sockaddr_in *dst)
{
    b[0] = 5; b[1] = cmd; b[2] = 0; b[3] = 1;
    memcpy(b + 4, &dst->sin_addr, 4);
    memcpy(b + 8, &dst->sin_port, 2);
    return 10;
}

/* Length of a SOCKS5 reply given its first 5 bytes, or -1. */
static int socks_reply_len(const uint8_t *h)
{
    switch (h[3]) {
    case 1: return 10;
    case 4: return 22;
    case 3: return 4 + 1 + h[4] + 2;
    default: return -1;
    }
}

/* "CONNECT a.b.c.d:port HTTP/1.1" with its Host header; returns the length. */
static int build_http_connect(char *b, size_t size, const struct sockaddr_in *dst)
{
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &dst->sin_addr, ip, sizeof ip);
    unsigned port = ntohs(dst->sin_port);
    return snprintf(b, size, "CONNECT %s:%u HTTP/1.1\r\nHost: %s:%u\r\n\r\n", ip, port, ip, port);
}

/* An HTTP response head ending in a blank line, status 200: 1; incomplete: 0; else -1. */
static int http_reply_done(const uint8_t *in, int len)
{
    if (len < 12)
        return 0;
    if (memcmp(in, "HTTP/1.", 7) != 0 || memcmp(in + 9, "200", 3) != 0)
        return -1;
    for (int i = 3; i < len; i++)
        if (in[i - 3] == '\r' && in[i - 2] == '\n' && in[i - 1] == '\r' && in[i] == '\n')
            return i + 1 == len ? 1 : -1; /* nothing may follow before we send */
    return len >= 299 ? -1 : 0;
}

/* ------------------------------------------------------------------ */
/* Non-blocking client connection state machine                        */
/* ------------------------------------------------------------------ */
enum { C_FREE, C_CONNECTING, C_GREET, C_HTTP, C_REPLY, C_DATA, C_EOFWAIT, C_IDLE };
enum { HS_WAIT = 0, HS_DONE = 1, HS_ERR = -1 };

struct cconn {
    int fd;
    int state;
    uint64_t t0;
    uint8_t in[300];
    int inlen;
    uint8_t out[128];
    int outlen, outoff;
    uint64_t got, want, start;
    int err_stage; /* for diagnostics */
};

static int flush_out(struct cconn *c)
{
    while (c->outoff < c->outlen) {
        ssize_t n = send(c->fd, c->out + c->outoff, (size_t)(c->outlen - c->outoff), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            return -1;
        }
        c->outoff += (int)n;
    }
    return 1;
}

static void queue_out(struct cconn *c, const void *p, int len)
{
    memcpy(c->out, p, (size_t)len);
    c->outlen = len;
    c->outoff = 0;
}

/* read until c->inlen == need; 1 done, 0 wait, -1 error/EOF */
static int read_exact(struct cconn *c, int need)
{
    while (c->inlen < need) {
        ssize_t n = recv(c->fd, c->in + c->inlen, (size_t)(need - c->inlen), 0);
        if (n > 0) {
            c->inlen += (int)n;
            continue;
        }
        if (n == 0)
            return -1;
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        return -1;
    }
    return 1;
}

static int cconn_open(struct cconn *c, int ep)
{
    memset(c, 0, sizeof *c);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        return -1;
    set_nodelay(c->fd);
    const struct sockaddr_in *dst = g_noproxy ? &g_target : &g_proxy;
    if (connect(c->fd, (const struct sockaddr *)dst, sizeof *dst) < 0 && errno != EINPROGRESS) {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    c->state = C_CONNECTING;
    c->t0 = now_ns();
    return 0;
}

static void cconn_close(struct cconn *c, int rst)
{
    if (c->fd >= 0) {
        if (rst)
            set_linger0(c->fd);
        close(c->fd);
    }
    c->fd = -1;
    c->state = C_FREE;
}

/* Drive connect + SOCKS5 greeting + CONNECT.  cmd is always CONNECT here. */
static int handshake(struct cconn *c, uint32_t ev)
{
    int r;
    for (;;) {
        switch (c->state) {
        case C_CONNECTING: {
            if (ev & EPOLLERR) {
                c->err_stage = 1;
                return HS_ERR;
            }
            if (!(ev & EPOLLOUT))
                return HS_WAIT;
            int soerr = 0;
            socklen_t sl = sizeof soerr;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
            if (soerr) {
                c->err_stage = 1;
                return HS_ERR;
            }
            if (g_noproxy)
                return HS_DONE;
            if (g_http) {
                char req[128];
                queue_out(c, req, build_http_connect(req, sizeof req, &g_target));
                c->inlen = 0;
                c->state = C_HTTP;
                break;
            }
            static const uint8_t greet[3] = {5, 1, 0};
            queue_out(c, greet, 3);
            c->inlen = 0;
            c->state = C_GREET;
            break;
        }
        case C_GREET:
            if ((r = flush_out(c)) <= 0)
                return r < 0 ? (c->err_stage = 2, HS_ERR) : HS_WAIT;
            if ((r = read_exact(c, 2)) <= 0)
                return r < 0 ? (c->err_stage = 2, HS_ERR) : HS_WAIT;
            if (c->in[0] != 5 || c->in[1] != 0) {
                c->err_stage = 2;
                return HS_ERR;
            }
            {
                uint8_t req[10];
                queue_out(c, req, build_connect_req(req, 1, &g_target));
            }
            c->inlen = 0;
            c->state = C_REPLY;
            break;
        case C_HTTP:
            if ((r = flush_out(c)) <= 0)
                return r < 0 ? (c->err_stage = 3, HS_ERR) : HS_WAIT;
            for (;;) {
                ssize_t n = recv(c->fd, c->in + c->inlen, sizeof c->in - 1 - (size_t)c->inlen, 0);
                if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                    c->err_stage = 3;
                    return HS_ERR;
                }
                if (n < 0)
                    return HS_WAIT;
                c->inlen += (int)n;
                r = http_reply_done(c->in, c->inlen);
                if (r < 0) {
                    c->err_stage = 3;
                    return HS_ERR;
                }
                if (r > 0)
                    break;
            }
            c->inlen = 0;
            return HS_DONE;
        case C_REPLY: {
            if ((r = flush_out(c)) <= 0)
                return r < 0 ? (c->err_stage = 3, HS_ERR) : HS_WAIT;
            if ((r = read_exact(c, 5)) <= 0)
                return r < 0 ? (c->err_stage = 3, HS_ERR) : HS_WAIT;
            int need = socks_reply_len(c->in);
            if (c->in[0] != 5 || c->in[1] != 0 || need < 0) {
                c->err_stage = 3;
                return HS_ERR;
            }
            if ((r = read_exact(c, need)) <= 0)
                return r < 0 ? (c->err_stage = 3, HS_ERR) : HS_WAIT;
            c->inlen = 0;
            return HS_DONE;
        }
        default:
            return HS_DONE;
        }
    }
}

/* ------------------------------------------------------------------ */
/* sessions                                                            */
/* ------------------------------------------------------------------ */
struct sess_worker {
    pthread_t th;
    int n;
    uint64_t t_start, deadline;
    uint64_t ok, err, timeouts, eof_timeouts, err_stage[6];
};

static uint8_t g_payload[2048];

static void sess_fail(struct sess_worker *w, struct cconn *c)
{
    w->err++;
    if (c->err_stage >= 0 && c->err_stage < 6)
        w->err_stage[c->err_stage]++;
    cconn_close(c, 1);
}

/* returns 1 when the session finished OK, 0 pending, -1 error */
static int sess_step(struct cconn *c, uint32_t ev)
{
    int r;
    if (c->state <= C_REPLY) {
        r = handshake(c, ev);
        if (r != HS_DONE)
            return r == HS_ERR ? -1 : 0;
        queue_out(c, g_payload, g_size > 64 ? 64 : g_size);
        c->inlen = 0;
        c->state = C_DATA;
    }
    if (c->state == C_DATA) {
        if ((r = flush_out(c)) <= 0)
            return r < 0 ? (c->err_stage = 4, -1) : 0;
        if ((r = read_exact(c, c->outlen)) <= 0)
            return r < 0 ? (c->err_stage = 4, -1) : 0;
        if (memcmp(c->in, g_payload, (size_t)c->outlen) != 0) {
            c->err_stage = 4;
            return -1;
        }
        if (g_rst)
            return 1; /* caller closes with SO_LINGER{1,0} */
        c->state = C_EOFWAIT;
    }
    if (c->state == C_EOFWAIT) {
        char b[64];
        ssize_t n = recv(c->fd, b, sizeof b, 0);
        if (n == 0)
            return 1; /* the target (via the proxy) closed first: good */
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return 0;
        c->err_stage = 5;
        return -1;
    }
    return 0;
}

static void *sess_thread(void *arg)
{
    struct sess_worker *w = arg;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct cconn *conns = calloc((size_t)w->n, sizeof *conns);
    struct epoll_event evs[MAXEV];
    uint64_t tmo = (uint64_t)(g_timeout * 1e9);
    uint64_t last_sweep = now_ns();
    int active = 0;

    for (int i = 0; i < w->n; i++) {
        if (cconn_open(&conns[i], ep) == 0)
            active++;
        else {
            w->err++;
            conns[i].fd = -1;
        }
    }
    /* after the deadline, let in-flight sessions finish (not counted) for <= 2 s */
    uint64_t hard_end = w->deadline + 2000000000ull;
    while (active > 0) {
        uint64_t t = now_ns();
        if (t >= hard_end)
            break;
        int nev = epoll_wait(ep, evs, MAXEV, 50);
        t = now_ns();
        for (int i = 0; i < nev; i++) {
            struct cconn *c = evs[i].data.ptr;
            if (c->fd < 0)
                continue;
            int r = sess_step(c, evs[i].events);
            if (r == 0)
                continue;
            if (r > 0) {
                if (t <= w->deadline)
                    w->ok++;
                cconn_close(c, g_rst);
            } else {
                if (t <= w->deadline)
                    sess_fail(w, c);
                else
                    cconn_close(c, 1);
            }
            active--;
            if (t < w->deadline) {
                /* give up early if nothing works at all */
                if (w->ok == 0 && w->err > 2000)
                    continue;
                if (cconn_open(c, ep) == 0)
                    active++;
                else
                    w->err++;
            }
        }
        t = now_ns(); /* conns opened above have t0 > the earlier t */
        if (t - last_sweep > 100000000ull) {
            last_sweep = t;
            for (int i = 0; i < w->n; i++) {
                struct cconn *c = &conns[i];
                if (c->fd >= 0 && t > c->t0 && t - c->t0 > tmo) {
                    if (c->state == C_EOFWAIT)
                        w->eof_timeouts++;
                    else
                        w->timeouts++;
                    w->err++;
                    cconn_close(c, 1);
                    active--;
                    if (t < w->deadline && cconn_open(c, ep) == 0)
                        active++;
                }
            }
        }
    }
    for (int i = 0; i < w->n; i++)
        if (conns[i].fd >= 0)
            cconn_close(&conns[i], 1);
    free(conns);
    close(ep);
    return NULL;
}

static int run_sessions(void)
{
    for (size_t i = 0; i < sizeof g_payload; i++)
        g_payload[i] = (uint8_t)('a' + i % 26);
    struct sess_worker *ws = calloc((size_t)g_threads, sizeof *ws);
    uint64_t t0 = now_ns();
    uint64_t dl = t0 + (uint64_t)(g_dur * 1e9);
    for (int i = 0; i < g_threads; i++) {
        ws[i].n = g_n / g_threads + (i < g_n % g_threads);
        ws[i].t_start = t0;
        ws[i].deadline = dl;
        pthread_create(&ws[i].th, NULL, sess_thread, &ws[i]);
    }
    uint64_t ok = 0, err = 0, to = 0, eto = 0, st[6] = {0};
    for (int i = 0; i < g_threads; i++) {
        pthread_join(ws[i].th, NULL);
        ok += ws[i].ok;
        err += ws[i].err;
        to += ws[i].timeouts;
        eto += ws[i].eof_timeouts;
        for (int j = 0; j < 6; j++)
            st[j] += ws[i].err_stage[j];
    }
    double secs = g_dur;
    printf("RESULT sessions ok=%llu err=%llu timeouts=%llu eof_timeouts=%llu "
           "err_connect=%llu err_greet=%llu err_reply=%llu err_echo=%llu err_eof=%llu "
           "secs=%.3f rate=%.1f inflight=%d threads=%d close=%s\n",
           (unsigned long long)ok, (unsigned long long)err, (unsigned long long)to,
           (unsigned long long)eto, (unsigned long long)st[1], (unsigned long long)st[2],
           (unsigned long long)st[3], (unsigned long long)st[4], (unsigned long long)st[5], secs,
           ok / secs, g_n, g_threads, g_rst ? "rst" : "target-first");
    free(ws);
    return ok > 0 ? 0 : 1;
}

/* ------------------------------------------------------------------ */
/* bulk                                                                */
/* ------------------------------------------------------------------ */
struct bulk_worker {
    pthread_t th;
    int first, count; /* stream indices */
    uint64_t per_stream;
    uint64_t deadline;
    uint64_t bytes, ok, err, corrupt, t_last;
};

static void *bulk_thread(void *arg)
{
    struct bulk_worker *w = arg;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct cconn *conns = calloc((size_t)w->count, sizeof *conns);
    uint8_t *buf = malloc(CHUNK);
    struct epoll_event evs[MAXEV];
    int active = 0;
    for (int i = 0; i < w->count; i++) {
        if (cconn_open(&conns[i], ep) == 0) {
            conns[i].want = w->per_stream;
            conns[i].start = (uint64_t)(w->first + i) * 37u % PAT_PERIOD;
            active++;
        } else {
            conns[i].fd = -1;
            w->err++;
        }
    }
    while (active > 0 && now_ns() < w->deadline) {
        int nev = epoll_wait(ep, evs, MAXEV, 50);
        for (int i = 0; i < nev; i++) {
            struct cconn *c = evs[i].data.ptr;
            if (c->fd < 0)
                continue;
            int done = 0, bad = 0;
            if (c->state <= C_REPLY) {
                int r = handshake(c, evs[i].events);
                if (r == HS_ERR)
                    bad = 1;
                else if (r == HS_DONE) {
                    uint8_t req[16];
                    uint64_t cnt = c->want, st = c->start;
                    for (int b = 0; b < 8; b++) {
                        req[b] = (uint8_t)(cnt >> (8 * b));
                        req[8 + b] = (uint8_t)(st >> (8 * b));
                    }
                    queue_out(c, req, 16);
                    c->state = C_DATA;
                }
            }
            if (!bad && c->state == C_DATA) {
                int r = flush_out(c);
                if (r < 0)
                    bad = 1;
                while (r > 0) {
                    ssize_t n = recv(c->fd, buf, CHUNK, 0);
                    if (n > 0) {
                        uint64_t off = (c->start + c->got) % PAT_PERIOD;
                        if (c->got + (uint64_t)n > c->want ||
                            memcmp(buf, g_pat + off, (size_t)n) != 0) {
                            w->corrupt++;
                            bad = 1;
                            break;
                        }
                        c->got += (uint64_t)n;
                        w->bytes += (uint64_t)n;
                        continue;
                    }
                    if (n == 0) {
                        if (c->got == c->want)
                            done = 1;
                        else
                            bad = 1;
                        break;
                    }
                    if (errno != EAGAIN && errno != EINTR)
                        bad = 1;
                    break;
                }
            }
            if (done || bad) {
                if (done)
                    w->ok++;
                else
                    w->err++;
                w->t_last = now_ns();
                cconn_close(c, bad);
                active--;
            }
        }
    }
    for (int i = 0; i < w->count; i++)
        if (conns[i].fd >= 0)
            cconn_close(&conns[i], 1);
    if (active > 0)
        w->t_last = now_ns();
    free(buf);
    free(conns);
    close(ep);
    return NULL;
}

static int run_bulk(void)
{
    if (g_threads > g_streams)
        g_threads = g_streams;
    struct bulk_worker *ws = calloc((size_t)g_threads, sizeof *ws);
    uint64_t per = g_bytes / (uint64_t)g_streams;
    uint64_t t0 = now_ns();
    int idx = 0;
    for (int i = 0; i < g_threads; i++) {
        ws[i].count = g_streams / g_threads + (i < g_streams % g_threads);
        ws[i].first = idx;
        idx += ws[i].count;
        ws[i].per_stream = per;
        ws[i].deadline = t0 + (uint64_t)(g_dur * 1e9);
        pthread_create(&ws[i].th, NULL, bulk_thread, &ws[i]);
    }
    uint64_t bytes = 0, ok = 0, err = 0, corrupt = 0, tl = t0;
    for (int i = 0; i < g_threads; i++) {
        pthread_join(ws[i].th, NULL);
        bytes += ws[i].bytes;
        ok += ws[i].ok;
        err += ws[i].err;
        corrupt += ws[i].corrupt;
        if (ws[i].t_last > tl)
            tl = ws[i].t_last;
    }
    double secs = (double)(tl - t0) / 1e9;
    if (secs <= 0)
        secs = 1e-9;
    int complete = ok == (uint64_t)g_streams;
    printf("RESULT bulk streams=%d ok=%llu err=%llu corrupt=%llu bytes=%llu secs=%.3f "
           "mbps=%.1f complete=%d\n",
           g_streams, (unsigned long long)ok, (unsigned long long)err,
           (unsigned long long)corrupt, (unsigned long long)bytes, secs, bytes / secs / 1e6,
           complete);
    free(ws);
    return (corrupt == 0 && bytes > 0) ? 0 : 1;
}

/* ------------------------------------------------------------------ */
/* idle                                                                */
/* ------------------------------------------------------------------ */
static int run_idle(void)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct cconn *conns = calloc((size_t)g_k, sizeof *conns);
    struct epoll_event evs[MAXEV];
    int next = 0, inprog = 0, ok = 0, err = 0, dropped = 0;
    uint64_t t0 = now_ns();
    uint64_t setup_deadline = t0 + (uint64_t)(60 * 1e9);
    uint64_t tmo = (uint64_t)(g_timeout * 1e9);
    uint64_t last_sweep = t0;
    for (int i = 0; i < g_k; i++)
        conns[i].fd = -1;

    while ((ok + err < g_k) && now_ns() < setup_deadline) {
        while (next < g_k && inprog < g_conc) {
            if (cconn_open(&conns[next], ep) == 0)
                inprog++;
            else {
                conns[next].fd = -1;
                err++;
            }
            next++;
        }
        int nev = epoll_wait(ep, evs, MAXEV, 50);
        for (int i = 0; i < nev; i++) {
            struct cconn *c = evs[i].data.ptr;
            if (c->fd < 0)
                continue;
            int bad = 0, done = 0;
            if (c->state == C_IDLE) {
                /* an established tunnel woke up: only EOF/error is possible */
                if (evs[i].events & (EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
                    dropped++;
                    cconn_close(c, 1);
                }
                continue;
            }
            if (c->state <= C_REPLY) {
                int r = handshake(c, evs[i].events);
                if (r == HS_ERR)
                    bad = 1;
                else if (r == HS_DONE) {
                    queue_out(c, "x", 1);
                    c->state = C_DATA;
                }
            }
            if (!bad && c->state == C_DATA) {
                int r = flush_out(c);
                if (r < 0)
                    bad = 1;
                else if (r > 0) {
                    r = read_exact(c, 1);
                    if (r < 0 || (r > 0 && c->in[0] != 'x'))
                        bad = 1;
                    else if (r > 0)
                        done = 1;
                }
            }
            if (bad) {
                err++;
                inprog--;
                cconn_close(c, 1);
            } else if (done) {
                ok++;
                inprog--;
                c->state = C_IDLE;
            }
        }
        uint64_t t = now_ns();
        if (t - last_sweep > 100000000ull) {
            last_sweep = t;
            for (int i = 0; i < next; i++) {
                struct cconn *c = &conns[i];
                if (c->fd >= 0 && c->state != C_IDLE && t > c->t0 && t - c->t0 > tmo) {
                    err++;
                    inprog--;
                    cconn_close(c, 1);
                }
            }
        }
    }
    double setup = (double)(now_ns() - t0) / 1e9;
    printf("READY idle ok=%d err=%d setup_secs=%.3f\n", ok, err, setup);
    fflush(stdout);

    /* hold until stdin says go (line or EOF), bounded by --hold */
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev);
    uint64_t hold_end = now_ns() + (uint64_t)(g_hold * 1e9);
    int released = 0;
    while (!released && now_ns() < hold_end) {
        int nev = epoll_wait(ep, evs, MAXEV, 200);
        for (int i = 0; i < nev; i++) {
            struct cconn *c = evs[i].data.ptr;
            if (!c) {
                released = 1;
                continue;
            }
            if (c->fd >= 0 && (evs[i].events & (EPOLLERR | EPOLLHUP | EPOLLRDHUP))) {
                dropped++;
                cconn_close(c, 1);
            }
        }
    }
    for (int i = 0; i < g_k; i++)
        if (conns[i].fd >= 0)
            cconn_close(&conns[i], 0);
    printf("RESULT idle ok=%d err=%d dropped=%d setup_secs=%.3f\n", ok, err, dropped, setup);
    free(conns);
    close(ep);
    return ok > 0 ? 0 : 1;
}

/* ------------------------------------------------------------------ */
/* blocking helpers (rr, udp control connection)                       */
/* ------------------------------------------------------------------ */
static int read_full(int fd, void *b, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, (char *)b + got, n - got, 0);
        if (r <= 0) {
            if (r < 0 && errno == EINTR)
                continue;
            return -1;
        }
        got += (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *b, size_t n)
{
    size_t off = 0;
    while (off < n) {
        ssize_t r = send(fd, (const char *)b + off, n - off, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        off += (size_t)r;
    }
    return 0;
}

/* Blocking connect to proxy (or target if none) + SOCKS5 command.
 * On success returns fd and fills *bnd with the reply's BND address (IPv4 only). */
static int socks_blocking(uint8_t cmd, const struct sockaddr_in *dst, struct sockaddr_in *bnd)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {(time_t)g_timeout, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    set_nodelay(fd);
    const struct sockaddr_in *to = g_noproxy ? &g_target : &g_proxy;
    if (connect(fd, (const struct sockaddr *)to, sizeof *to) < 0) {
        fprintf(stderr, "loadgen: connect: %s\n", strerror(errno));
        close(fd);
        return -1;
    }
    if (g_noproxy)
        return fd;
    uint8_t b[300];
    if (g_http) {
        char req[128];
        int len = build_http_connect(req, sizeof req, dst), got = 0, r = 0;
        if (write_full(fd, req, (size_t)len) < 0)
            r = -1;
        while (r == 0 && got < (int)sizeof b - 1) {
            if (read_full(fd, b + got, 1) < 0) {
                r = -1;
                break;
            }
            r = http_reply_done(b, ++got);
        }
        if (r <= 0) {
            fprintf(stderr, "loadgen: HTTP CONNECT refused or failed\n");
            close(fd);
            return -1;
        }
        if (bnd)
            memset(bnd, 0, sizeof *bnd);
        return fd;
    }
    if (write_full(fd, "\x05\x01\x00", 3) < 0 || read_full(fd, b, 2) < 0 || b[0] != 5 || b[1] != 0) {
        fprintf(stderr, "loadgen: SOCKS greeting failed\n");
        close(fd);
        return -1;
    }
    int len = build_connect_req(b, cmd, dst);
    if (write_full(fd, b, (size_t)len) < 0 || read_full(fd, b, 5) < 0) {
        fprintf(stderr, "loadgen: SOCKS request failed (no reply)\n");
        close(fd);
        return -1;
    }
    int need = socks_reply_len(b);
    if (b[0] != 5 || b[1] != 0 || need < 0 || read_full(fd, b + 5, (size_t)need - 5) < 0) {
        fprintf(stderr, "loadgen: SOCKS request refused: REP=%d\n", b[1]);
        close(fd);
        return -1;
    }
    if (bnd) {
        memset(bnd, 0, sizeof *bnd);
        bnd->sin_family = AF_INET;
        if (b[3] == 1) {
            memcpy(&bnd->sin_addr, b + 4, 4);
            memcpy(&bnd->sin_port, b + 8, 2);
        } else if (b[3] == 4) {
            memcpy(&bnd->sin_port, b + 20, 2); /* IPv6 relay: use proxy IP below */
        } else {
            memcpy(&bnd->sin_port, b + need - 2, 2);
        }
    }
    return fd;
}

/* ------------------------------------------------------------------ */
/* rr                                                                  */
/* ------------------------------------------------------------------ */
static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int run_rr(void)
{
    int fd = socks_blocking(1, &g_target, NULL);
    if (fd < 0) {
        printf("RESULT rr ok=0 err=1\n");
        return 1;
    }
    uint64_t *lat = malloc(sizeof(uint64_t) * (size_t)g_rounds);
    long n = 0;
    char c = 'p', r;
    /* warm-up: 200 round trips, not measured */
    for (int i = 0; i < 200; i++) {
        if (write_full(fd, &c, 1) < 0 || read_full(fd, &r, 1) < 0) {
            printf("RESULT rr ok=0 err=1\n");
            close(fd);
            free(lat);
            return 1;
        }
    }
    uint64_t t0 = now_ns(), dl = t0 + (uint64_t)(g_dur * 1e9), t = t0;
    int err = 0;
    while (n < g_rounds && t < dl) {
        uint64_t a = now_ns();
        if (write_full(fd, &c, 1) < 0) {
            err = 1;
            break;
        }
        if (g_spin) {
            /* busy-poll: this vCPU never idles waiting for the pong */
            ssize_t k;
            while ((k = recv(fd, &r, 1, MSG_DONTWAIT)) < 0 && (errno == EAGAIN || errno == EINTR) &&
                   now_ns() < dl + 1000000000ull)
                ;
            if (k != 1 || r != c) {
                err = 1;
                break;
            }
        } else if (read_full(fd, &r, 1) < 0 || r != c) {
            err = 1;
            break;
        }
        t = now_ns();
        lat[n++] = t - a;
    }
    close(fd);
    if (n == 0) {
        printf("RESULT rr ok=0 err=1\n");
        free(lat);
        return 1;
    }
    qsort(lat, (size_t)n, sizeof *lat, cmp_u64);
    double sum = 0;
    for (long i = 0; i < n; i++)
        sum += (double)lat[i];
    printf("RESULT rr ok=%ld err=%d secs=%.3f p50_us=%.1f p90_us=%.1f p99_us=%.1f p999_us=%.1f "
           "max_us=%.1f mean_us=%.1f\n",
           n, err, (double)(t - t0) / 1e9, lat[n / 2] / 1e3, lat[n * 90 / 100] / 1e3,
           lat[n * 99 / 100] / 1e3, lat[n * 999 / 1000] / 1e3, lat[n - 1] / 1e3, sum / n / 1e3);
    free(lat);
    return err;
}

/* ------------------------------------------------------------------ */
/* udp                                                                 */
/* ------------------------------------------------------------------ */
static int run_udp(void)
{
    int us = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in me = {.sin_family = AF_INET};
    me.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (us < 0 || bind(us, (struct sockaddr *)&me, sizeof me) < 0)
        die("udp bind: %s", strerror(errno));
    socklen_t sl = sizeof me;
    getsockname(us, (struct sockaddr *)&me, &sl);

    int ctl = -1;
    struct sockaddr_in relay = g_target;
    if (!g_noproxy) {
        /* UDP ASSOCIATE with our real UDP source address (dante checks it) */
        ctl = socks_blocking(3, &me, &relay);
        if (ctl < 0) {
            printf("RESULT udp ok=0 err=1 reason=associate_failed\n");
            close(us);
            return 1;
        }
        if (relay.sin_addr.s_addr == 0) /* 0.0.0.0 or IPv6: use the proxy's address */
            relay.sin_addr = g_proxy.sin_addr;
        if (relay.sin_port == 0) {
            printf("RESULT udp ok=0 err=1 reason=no_relay_port\n");
            close(ctl);
            close(us);
            return 1;
        }
    }
    int hdr = g_noproxy ? 0 : 10;
    int plen = g_size < 16 ? 16 : (g_size > 1400 ? 1400 : g_size);
    uint8_t pkt[1500], rb[2048];
    if (hdr) {
        pkt[0] = 0; pkt[1] = 0; pkt[2] = 0; pkt[3] = 1;
        memcpy(pkt + 4, &g_target.sin_addr, 4);
        memcpy(pkt + 8, &g_target.sin_port, 2);
    }
    for (int i = 8; i < plen; i++)
        pkt[hdr + i] = (uint8_t)(i * 7);

    uint64_t sent = 0, rcvd = 0, rcvd_in = 0, bad = 0, declared_lost = 0, outstanding = 0;
    uint64_t t0 = now_ns(), dl = t0 + (uint64_t)(g_dur * 1e9), last_rx = t0;
    uint64_t stall_ns = 20000000ull; /* 20 ms without an echo: consider the window lost */
    int draining = 0;
    uint64_t drain_end = dl + 300000000ull;
    for (;;) {
        uint64_t t = now_ns();
        if (!draining && t >= dl)
            draining = 1;
        if (draining && t >= drain_end)
            break;
        while (!draining && outstanding < (uint64_t)g_window) {
            memcpy(pkt + hdr, &sent, 8);
            ssize_t n = sendto(us, pkt, (size_t)(hdr + plen), 0, (struct sockaddr *)&relay, sizeof relay);
            if (n < 0)
                break;
            sent++;
            outstanding++;
        }
        struct pollfd pfd = {.fd = us, .events = POLLIN};
        poll(&pfd, 1, 5);
        for (;;) {
            ssize_t n = recv(us, rb, sizeof rb, 0);
            if (n < 0)
                break;
            int off = 0;
            if (hdr) {
                if (n < 10 || rb[0] || rb[1] || rb[2]) {
                    bad++;
                    continue;
                }
                off = rb[3] == 1 ? 10 : rb[3] == 4 ? 22 : rb[3] == 3 ? 7 + rb[4] : -1;
                if (off < 0) {
                    bad++;
                    continue;
                }
            }
            if (n - off != plen || memcmp(rb + off + 8, pkt + hdr + 8, (size_t)plen - 8) != 0) {
                bad++;
                continue;
            }
            uint64_t seq;
            memcpy(&seq, rb + off, 8);
            if (seq >= sent) {
                bad++;
                continue;
            }
            rcvd++;
            if (!draining)
                rcvd_in++;
            if (outstanding)
                outstanding--;
            last_rx = now_ns();
        }
        t = now_ns();
        if (!draining && outstanding > 0 && t - last_rx > stall_ns) {
            declared_lost += outstanding;
            outstanding = 0;
            last_rx = t;
        }
    }
    if (ctl >= 0)
        close(ctl);
    close(us);
    double secs = g_dur;
    double loss = sent ? 100.0 * (double)(sent > rcvd ? sent - rcvd : 0) / (double)sent : 0;
    printf("RESULT udp ok=%llu err=%llu sent=%llu rcvd=%llu loss_pct=%.2f secs=%.3f rate=%.1f "
           "window=%d size=%d\n",
           (unsigned long long)rcvd_in, (unsigned long long)bad, (unsigned long long)sent,
           (unsigned long long)rcvd, loss, secs, rcvd_in / secs, g_window, plen);
    (void)declared_lost;
    return rcvd_in > 0 ? 0 : 1;
}

/* ------------------------------------------------------------------ */
/* targets                                                             */
/* ------------------------------------------------------------------ */
enum { T_LECHO, T_LKEEP, T_LBULK, T_UDP, T_STDIN, T_ECHO, T_KEEP, T_BULK };

struct tconn {
    int kind;
    int fd;
    int blen, boff;
    uint32_t echoed;
    uint8_t req[16];
    int reqlen;
    uint64_t remaining, off;
    uint8_t buf[16384];
};

struct tlisten {
    int kind;
    int fd;
};

struct tworker {
    pthread_t th;
    int idx;
    uint16_t ports[4]; /* echo keep bulk udp, 0 = pick */
    int fds[4];
};

static int mk_listener(int type, uint16_t port, int reuseport)
{
    int fd = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuseport)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind: %s", strerror(errno));
    if (type == SOCK_STREAM && listen(fd, 4096) < 0)
        die("listen: %s", strerror(errno));
    if (type == SOCK_DGRAM) {
        int sz = 4 << 20;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    }
    return fd;
}

static void tconn_close(struct tconn *c)
{
    close(c->fd);
    free(c);
}

/* returns 0 keep, -1 closed+freed */
static int tconn_step(struct tconn *c)
{
    if (c->kind == T_ECHO || c->kind == T_KEEP) {
        for (;;) {
            while (c->boff < c->blen) {
                ssize_t n = send(c->fd, c->buf + c->boff, (size_t)(c->blen - c->boff), MSG_NOSIGNAL);
                if (n < 0) {
                    if (errno == EAGAIN || errno == EINTR)
                        return 0;
                    tconn_close(c);
                    return -1;
                }
                c->boff += (int)n;
                c->echoed += (uint32_t)n;
            }
            /* echo target: close first once a 64-byte message has been echoed */
            if (c->kind == T_ECHO && c->echoed >= 64) {
                tconn_close(c);
                return -1;
            }
            size_t want = sizeof c->buf;
            if (c->kind == T_ECHO)
                want = 64 - c->echoed;
            ssize_t n = recv(c->fd, c->buf, want, 0);
            if (n > 0) {
                c->blen = (int)n;
                c->boff = 0;
                continue;
            }
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return 0;
            tconn_close(c);
            return -1;
        }
    }
    /* bulk */
    while (c->reqlen < 16) {
        ssize_t n = recv(c->fd, c->req + c->reqlen, (size_t)(16 - c->reqlen), 0);
        if (n > 0) {
            c->reqlen += (int)n;
            if (c->reqlen == 16) {
                c->remaining = 0;
                c->off = 0;
                for (int b = 0; b < 8; b++) {
                    c->remaining |= (uint64_t)c->req[b] << (8 * b);
                    c->off |= (uint64_t)c->req[8 + b] << (8 * b);
                }
            }
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return 0;
        tconn_close(c);
        return -1;
    }
    while (c->remaining > 0) {
        size_t len = c->remaining < CHUNK ? (size_t)c->remaining : CHUNK;
        ssize_t n = send(c->fd, g_pat + (c->off % PAT_PERIOD), len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            tconn_close(c);
            return -1;
        }
        c->remaining -= (uint64_t)n;
        c->off += (uint64_t)n;
    }
    tconn_close(c); /* everything queued: FIN follows the data */
    return -1;
}

static void *target_thread(void *arg)
{
    struct tworker *w = arg;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    static const int kinds[4] = {T_LECHO, T_LKEEP, T_LBULK, T_UDP};
    struct tlisten ls[5];
    for (int i = 0; i < 4; i++) {
        ls[i].kind = kinds[i];
        ls[i].fd = w->fds[i];
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &ls[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, ls[i].fd, &ev);
    }
    if (w->idx == 0) {
        ls[4].kind = T_STDIN;
        ls[4].fd = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &ls[4]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev) < 0) {
            /* stdin not pollable (e.g. /dev/null file): rely on signals */
        }
    }
    struct epoll_event evs[MAXEV];
    uint8_t ubuf[2048];
    uint64_t end = now_ns() + (uint64_t)(g_dur * 1e9);
    for (;;) {
        int nev = epoll_wait(ep, evs, MAXEV, 1000);
        if (w->idx == 0 && now_ns() > end) {
            fprintf(stderr, "target: lifetime (-d %.0f s) reached, exiting\n", g_dur);
            exit(0);
        }
        for (int i = 0; i < nev; i++) {
            int kind = *(int *)evs[i].data.ptr;
            if (kind == T_STDIN) {
                char b[256];
                ssize_t n = read(0, b, sizeof b);
                if (n <= 0)
                    exit(0);
                continue;
            }
            if (kind == T_LECHO || kind == T_LKEEP || kind == T_LBULK) {
                struct tlisten *l = evs[i].data.ptr;
                for (int a = 0; a < 64; a++) {
                    int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) {
                        if (errno == EMFILE || errno == ENFILE)
                            fprintf(stderr, "target: accept: %s\n", strerror(errno));
                        break;
                    }
                    set_nodelay(fd);
                    struct tconn *c = calloc(1, sizeof *c);
                    c->fd = fd;
                    c->kind = kind == T_LECHO ? T_ECHO : kind == T_LKEEP ? T_KEEP : T_BULK;
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                             .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                    tconn_step(c);
                }
                continue;
            }
            if (kind == T_UDP) {
                struct tlisten *l = evs[i].data.ptr;
                for (int a = 0; a < 256; a++) {
                    struct sockaddr_storage from;
                    socklen_t fl = sizeof from;
                    ssize_t n = recvfrom(l->fd, ubuf, sizeof ubuf, 0, (struct sockaddr *)&from, &fl);
                    if (n < 0)
                        break;
                    sendto(l->fd, ubuf, (size_t)n, 0, (struct sockaddr *)&from, fl);
                }
                continue;
            }
            tconn_step((struct tconn *)evs[i].data.ptr);
        }
    }
    return NULL;
}

static int run_target(void)
{
    if (g_threads < 1)
        g_threads = 1;
    struct tworker *ws = calloc((size_t)g_threads, sizeof *ws);
    static const int types[4] = {SOCK_STREAM, SOCK_STREAM, SOCK_STREAM, SOCK_DGRAM};
    uint16_t ports[4] = {0};
    int rp = g_threads > 1;
    for (int t = 0; t < g_threads; t++) {
        ws[t].idx = t;
        for (int i = 0; i < 4; i++) {
            ws[t].fds[i] = mk_listener(types[i], ports[i], rp);
            if (!ports[i]) {
                struct sockaddr_in a;
                socklen_t sl = sizeof a;
                getsockname(ws[t].fds[i], (struct sockaddr *)&a, &sl);
                ports[i] = ntohs(a.sin_port);
            }
        }
    }
    printf("TARGET echo=%u keep=%u bulk=%u udp=%u threads=%d\n", ports[0], ports[1], ports[2],
           ports[3], g_threads);
    fflush(stdout);
    for (int t = 1; t < g_threads; t++)
        pthread_create(&ws[t].th, NULL, target_thread, &ws[t]);
    target_thread(&ws[0]);
    return 0;
}

/* ------------------------------------------------------------------ */
static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen target [-t THREADS] [-d MAX_LIFETIME_SECS]\n"
            "       loadgen sessions -p PROXY|none -T HOST:PORT [-n INFLIGHT] [-d SECS] [-t THREADS] [--rst]\n"
            "       (sessions, bulk, idle, rr: --http speaks HTTP CONNECT to the proxy instead of SOCKS5)\n"
            "       loadgen bulk     -p PROXY|none -T HOST:PORT [-S STREAMS] [-B TOTAL_BYTES] [-d MAX_SECS] [-t THREADS]\n"
            "       loadgen idle     -p PROXY|none -T HOST:PORT [-k TUNNELS] [-c CONCURRENCY] [--hold MAX_SECS]\n"
            "       loadgen rr       -p PROXY|none -T HOST:PORT [-d SECS] [-N ROUNDS] [--spin]\n"
            "       loadgen udp      -p PROXY|none -T HOST:PORT [-d SECS] [-w WINDOW] [-s SIZE]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    init_pattern();
    const char *cmd = argv[1];
    static const struct option lo[] = {
        {"proxy", required_argument, 0, 'p'},  {"target", required_argument, 0, 'T'},
        {"inflight", required_argument, 0, 'n'}, {"duration", required_argument, 0, 'd'},
        {"threads", required_argument, 0, 't'}, {"rst", no_argument, 0, 'R'},
        {"timeout", required_argument, 0, 'o'}, {"streams", required_argument, 0, 'S'},
        {"bytes", required_argument, 0, 'B'},  {"tunnels", required_argument, 0, 'k'},
        {"concurrency", required_argument, 0, 'c'}, {"hold", required_argument, 0, 'H'},
        {"rounds", required_argument, 0, 'N'}, {"window", required_argument, 0, 'w'},
        {"size", required_argument, 0, 's'},   {"spin", no_argument, 0, 'P'},
        {"http", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    const char *proxy = NULL, *target = NULL;
    int o, dur_set = 0;
    optind = 2;
    while ((o = getopt_long(argc, argv, "p:T:n:d:t:o:S:B:k:c:H:N:w:s:", lo, NULL)) != -1) {
        switch (o) {
        case 'p': proxy = optarg; break;
        case 'T': target = optarg; break;
        case 'n': g_n = atoi(optarg); break;
        case 'd': g_dur = atof(optarg); dur_set = 1; break;
        case 't': g_threads = atoi(optarg); break;
        case 'R': g_rst = 1; break;
        case 'o': g_timeout = atof(optarg); break;
        case 'S': g_streams = atoi(optarg); break;
        case 'B': g_bytes = strtoull(optarg, NULL, 10); break;
        case 'k': g_k = atoi(optarg); break;
        case 'c': g_conc = atoi(optarg); break;
        case 'H': g_hold = atof(optarg); break;
        case 'N': g_rounds = atol(optarg); break;
        case 'w': g_window = atoi(optarg); break;
        case 's': g_size = atoi(optarg); break;
        case 'P': g_spin = 1; break;
        case 'h': g_http = 1; break;
        default: usage();
        }
    }
    if (g_threads < 1) g_threads = 1;
    if (g_n < 1) g_n = 1;
    if (g_streams < 1) g_streams = 1;
    if (g_k < 1) g_k = 1;
    if (g_conc < 1) g_conc = 1;
    if (g_rounds < 1) g_rounds = 1;
    if (g_rounds > 50000000) g_rounds = 50000000;
    if (g_window < 1) g_window = 1;
    if (g_dur <= 0) g_dur = 1;
    if (g_dur > 7200) g_dur = 7200; /* bounded */
    if (g_hold > 600) g_hold = 600;

    if (strcmp(cmd, "target") == 0) {
        if (!dur_set)
            g_dur = 1800; /* a forgotten target never outlives half an hour */
        return run_target();
    }

    if (!proxy || !target)
        usage();
    if (strcmp(proxy, "none") == 0)
        g_noproxy = 1;
    else if (parse_hostport(proxy, &g_proxy) < 0)
        die("bad proxy address %s", proxy);
    if (parse_hostport(target, &g_target) < 0)
        die("bad target address %s", target);

    if (strcmp(cmd, "sessions") == 0)
        return run_sessions();
    if (strcmp(cmd, "bulk") == 0)
        return run_bulk();
    if (strcmp(cmd, "idle") == 0)
        return run_idle();
    if (strcmp(cmd, "rr") == 0)
        return run_rr();
    if (strcmp(cmd, "udp") == 0)
        return run_udp();
    usage();
    return 2;
}
