// A Java service for the runtimes causality scenario (uninstrumented; only the JDK's own
// classes): `java ChainJava.java PORT DOWNSTREAM_BASE_URL PREFIX`. The HttpServer runs each
// request on a thread of one pre-started pool, which hands the downstream call to a second
// pre-started pool (an ExecutorService) and waits for it: no thread is created per request.
// The call goes to DOWNSTREAM/PREFIX/<derive(id)> over HttpURLConnection's keep-alive cache.
import com.sun.net.httpserver.HttpServer;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.InetSocketAddress;
import java.net.URL;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;

public class ChainJava {
    static long derive(long id) { return (id * 7919 + 13) % 1000003; }

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        String downstream = args[1], prefix = args[2];
        ExecutorService requests = Executors.newFixedThreadPool(16);
        ExecutorService calls = Executors.newFixedThreadPool(16);
        // Start every thread of both pools now, as a warmed-up service has them.
        for (ExecutorService pool : new ExecutorService[] {requests, calls}) {
            for (int i = 0; i < 16; i++) pool.submit(() -> {});
        }
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", port), 256);
        server.setExecutor(requests);
        server.createContext("/", exchange -> {
            String path = exchange.getRequestURI().getPath();
            long id = Long.parseLong(path.substring(path.lastIndexOf('/') + 1));
            byte[] body;
            int status = 200;
            try {
                Future<byte[]> call = calls.submit(() -> {
                    URL url = new URL(downstream + "/" + prefix + "/" + derive(id));
                    HttpURLConnection c = (HttpURLConnection) url.openConnection();
                    try (InputStream in = c.getInputStream()) {
                        return in.readAllBytes();
                    }
                });
                body = call.get();
            } catch (Exception e) {
                status = 502;
                body = e.toString().getBytes();
            }
            exchange.getRequestBody().readAllBytes();
            exchange.sendResponseHeaders(status, body.length);
            try (OutputStream out = exchange.getResponseBody()) {
                out.write(body);
            }
        });
        server.start();
    }
}
