// An HTTPS client on the JDK's own TLS (JSSE, Java code: no library a uprobe can hold), run as
// a single source file: `java TlsJava.java URL`. Three requests on one keep-alive connection;
// prints each status.
import java.io.InputStream;
import java.net.URL;
import java.security.SecureRandom;
import java.security.cert.X509Certificate;
import javax.net.ssl.HttpsURLConnection;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManager;
import javax.net.ssl.X509TrustManager;

public class TlsJava {
    public static void main(String[] args) throws Exception {
        TrustManager[] trustAll = {
            new X509TrustManager() {
                public X509Certificate[] getAcceptedIssuers() { return new X509Certificate[0]; }
                public void checkClientTrusted(X509Certificate[] c, String t) {}
                public void checkServerTrusted(X509Certificate[] c, String t) {}
            }
        };
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(null, trustAll, new SecureRandom());
        HttpsURLConnection.setDefaultSSLSocketFactory(ctx.getSocketFactory());
        HttpsURLConnection.setDefaultHostnameVerifier((host, session) -> true);
        for (int i = 1; i <= 3; i++) {
            HttpsURLConnection c = (HttpsURLConnection) new URL(args[0] + "/users/" + (1000 + i)).openConnection();
            try (InputStream in = c.getInputStream()) {
                in.readAllBytes();
            }
            System.out.println(c.getResponseCode());
        }
    }
}
